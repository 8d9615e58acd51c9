# Shared functions of the vanilla GAN scripts; sourced by train_*.sh, test_*.sh and
# visualize_*.sh after they have set REPO_ROOT. Not meant to be run on its own.
#
# Environment variables (all optional):
#   PYTHON           Python interpreter (default: python)
#   CHECKPOINTS_DIR  parent folder of the run folders (default: REPO_ROOT/checkpoints)
#   DEVICE           device for evaluation: auto, cpu, cuda or cuda:N (default: auto)
#   IMAGE_SIZE       side of the real images prepared for FID (default: 128, as gan128)
#   N_PAIRS          VP pairs to generate, whose left images are the FID samples (default: 10000)
#   MODEL_TYPE       --model of the trained runs, gan128 or gan (default: gan128)
#   REAL_DIR         real images for FID (default: CHECKPOINTS_DIR/DATASET_real_IMAGE_SIZE)
#   VISUALIZE_OPTIONS  extra options of simple_gan/visualize.py, split at spaces
#                    (for example "--samples 4 --steps 5")
#   NPROC_PER_NODE   training processes (GPUs) on this node; above 1 the trainer runs under
#                    torchrun --standalone (default: 1, a plain process)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits, after passing SIGTERM on, for its
#                    processes to save and exit before it kills them (default here: 120)

REPO_ROOT="$(cd "$REPO_ROOT" && pwd)"

PYTHON="${PYTHON:-python}"
CHECKPOINTS_DIR="${CHECKPOINTS_DIR:-$REPO_ROOT/checkpoints}"
DEVICE="${DEVICE:-auto}"
IMAGE_SIZE="${IMAGE_SIZE:-128}"
N_PAIRS="${N_PAIRS:-10000}"
MODEL_TYPE="${MODEL_TYPE:-gan128}"
# pytorch-fid looks for its Inception weights in torch's hub cache and downloads them if absent.
TORCH_HOME="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}"
INCEPTION_WEIGHTS="$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth"

die() {
  echo "error: $*" >&2
  exit 2
}

# check_method METHOD: the --reg_type values of simple_gan/train.py.
check_method() {
  case "$1" in
    nog|olr|nog_olr|orojar|hp|none) ;;
    *) die "unknown method '$1'; expected nog, olr, nog_olr, orojar, hp or none" ;;
  esac
}

# parse_method_and_data DATA_VARIABLE [METHOD] [DATA_PATH] [options...]
# Sets METHOD (checked), DATAROOT and ARGS (the options). The data path is the argument after
# the method unless that is an option. Otherwise it comes from the environment variable named
# DATA_VARIABLE.
parse_method_and_data() {
  local data_variable="$1"
  shift
  [[ $# -ge 1 ]] || die "pass the method (nog, olr or orojar) as the first argument"
  METHOD="$1"
  shift
  check_method "$METHOD"
  DATAROOT="${!data_variable:-}"
  if [[ $# -gt 0 && "$1" != -* ]]; then
    DATAROOT="$1"
    shift
  fi
  [[ -n "$DATAROOT" ]] || die "pass the data path as an argument or set $data_variable"
  ARGS=("$@")
}

# run_training DATASET_MODE DATAROOT METHOD [train.py options...]
# Starts the run CHECKPOINTS_DIR/DATASET_METHOD, or resumes it when its folder exists (a
# requeued SLURM job or a second call). The trainer runs in the background so that this shell
# can pass a SIGTERM or SIGINT on at once, as SIGTERM. The trainer then saves latest.pt and
# exits 0. With NPROC_PER_NODE above 1 the signal goes to torchrun, which passes it on to every
# process, so all of them stop after the same step and rank 0 saves. torchrun itself then exits
# with status 1, so after a stop signal this function exits 0 whatever the launcher returned.
run_training() {
  local dataset_mode="$1" dataroot="$2" method="$3"
  shift 3
  local name="${dataset_mode}_${method}"
  local resume=()
  if [[ -f "$CHECKPOINTS_DIR/$name/config.json" ]]; then
    resume=(--continue_train)
    echo "resuming $CHECKPOINTS_DIR/$name"
  fi
  local nproc="${NPROC_PER_NODE:-1}"
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
  local launcher=("$PYTHON")
  if (( nproc > 1 )); then
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
    launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc")
  fi
  cd "$REPO_ROOT"
  "${launcher[@]}" simple_gan/train.py --dataset_mode "$dataset_mode" \
    --model "$MODEL_TYPE" --nz 30 --reg_type "$method" --dataroot "$dataroot" --name "$name" \
    --checkpoints_dir "$CHECKPOINTS_DIR" "${resume[@]}" "$@" &
  trainer=$!
  stop_signal=0
  trap 'stop_signal=1; kill -TERM "$trainer" 2>/dev/null || true' TERM INT
  # wait returns early when a trapped signal arrives, so wait again until the trainer is gone.
  while kill -0 "$trainer" 2>/dev/null; do
    wait "$trainer" || true
  done
  trap - TERM INT
  local status=0
  wait "$trainer" || status=$?
  if (( stop_signal )); then
    echo "stopped by a signal; run the same command again to resume"
    exit 0
  fi
  exit "$status"
}

# prepare_real_images DATASET_MODE DATAROOT OUT_DIR: the training view of the real images,
# as IMAGE_SIZE PNG files, unless OUT_DIR already contains PNG files.
prepare_real_images() {
  local dataset_mode="$1" dataroot="$2" out_dir="$3"
  if compgen -G "$out_dir/*.png" > /dev/null; then
    echo "real images: using the existing $out_dir"
    return
  fi
  "$PYTHON" simple_gan/lmdb_tool.py dump "$dataroot" "$out_dir" \
    --dataset_mode "$dataset_mode" --size "$IMAGE_SIZE"
}

# compute_fid RUN_DIR SAMPLES_DIR REAL_DIR: FID with pytorch-fid, merged into metrics.json.
compute_fid() {
  local run_dir="$1" samples="$2" real="$3"
  if [[ ! -f "$INCEPTION_WEIGHTS" ]]; then
    echo "FID skipped: Inception weights not found at $INCEPTION_WEIGHTS (pytorch-fid" \
      "downloads them there when online; copy the file there on an offline machine)"
    return
  fi
  local fid_device=()
  if [[ "$DEVICE" != auto ]]; then
    fid_device=(--device "$DEVICE")
  fi
  local output
  output="$("$PYTHON" -m pytorch_fid "${fid_device[@]}" "$samples" "$real")"
  echo "$output"
  local fid
  fid="$(sed -n 's/^FID:[[:space:]]*//p' <<< "$output")"
  "$PYTHON" -c 'import sys
from models.runs import update_metrics
update_metrics(sys.argv[1], fid={"value": float(sys.argv[2]),
               "settings": {"generated": sys.argv[3], "real": sys.argv[4],
                            "size": int(sys.argv[5]), "tool": "pytorch_fid"}})' \
    "$run_dir" "$fid" "$samples" "$real" "$IMAGE_SIZE"
  echo "FID $fid written to $run_dir/metrics.json"
}

# run_tests DATASET_MODE DATAROOT METHOD [gen_pairs.py options...]
# Traversals (plain and SeFa), VP pairs in RUN_DIR/vp_pairs and FID of their left images
# against the real images at IMAGE_SIZE.
run_tests() {
  local dataset_mode="$1" dataroot="$2" method="$3"
  shift 3
  local run_dir="$CHECKPOINTS_DIR/${dataset_mode}_${method}"
  local checkpoint="$run_dir/latest.pt"
  [[ -f "$checkpoint" ]] || die "checkpoint $checkpoint not found; train the run first"
  cd "$REPO_ROOT"

  echo "== traversals of $checkpoint"
  local visualize_options=()
  read -r -a visualize_options <<< "${VISUALIZE_OPTIONS:-}"
  "$PYTHON" simple_gan/visualize.py --model_path "$checkpoint" --device "$DEVICE" \
    --directions both "${visualize_options[@]}"

  echo "== VP pairs"
  if [[ -f "$run_dir/vp_pairs/labels.npy" ]]; then
    echo "VP pairs: using the existing $run_dir/vp_pairs"
  else
    "$PYTHON" gen_pairs.py --model_type "$MODEL_TYPE" --model_path "$checkpoint" \
      --n_pairs "$N_PAIRS" --save_dir "$run_dir/vp_pairs" --device "$DEVICE" "$@"
  fi

  echo "== FID"
  local real_dir="${REAL_DIR:-$CHECKPOINTS_DIR/${dataset_mode}_real_${IMAGE_SIZE}}"
  prepare_real_images "$dataset_mode" "$dataroot" "$real_dir"
  compute_fid "$run_dir" "$run_dir/vp_pairs/samples" "$real_dir"
}
