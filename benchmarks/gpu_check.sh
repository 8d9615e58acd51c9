#!/usr/bin/env bash
# Check the repository on a GPU machine in one go, without network (about 300 s in all).
#
# Usage:
#   benchmarks/gpu_check.sh                  # CUDA, published sizes
#   QUICK=1 DEVICE=cpu benchmarks/gpu_check.sh   # reduced sizes, to try the script on a CPU
#
# Parts, each under its own time limit so that a slow part cannot eat the others:
#   wheels      install the wheels in .whl/ (if any) into /tmp/site, without dependencies
#   environment torch, CUDA and GPU versions
#   tests       pytest -m gpu tests/test_gpu.py, with GPU_TEST_DEVICE=$DEVICE
#   benchmark   benchmarks/benchmark.py: trainers (fp32 and bf16), meta and nog sections
#   data        scikit-learn's digits written as 256-pixel PNGs (tools/digits_to_folder.py)
#   cifar       main_cifar100.py: ResNet-50, ZCA stem, NOG + OLR + OW, batch 128, ~30 steps
#   eigengan    eigengan/train_ffhq.py: 256 px, batch 64, NOG + OLR, bf16, 30 steps
#   simple_gan  simple_gan/train.py: gan128, batch 128, NOG + OLR, bf16, 30 steps
#
# Environment: OUT (output folder, default gpu_check_out in the repository root), DEVICE
# (default cuda), QUICK (1: small sizes and three times the time limits, for a CPU), PYTHON
# (default .venv/bin/python if present, else python3), LIMIT_<PART> (seconds, e.g.
# LIMIT_BENCHMARK=120). Extra arguments go to benchmark.py.
# Output: $OUT/logs/<part>.log, $OUT/benchmark.md, $OUT/runs/<time>/, and $OUT/summary.md, which is
# also printed last. The exit status is 1 when any part failed or timed out.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu_check_out}"
DEVICE="${DEVICE:-cuda}"
QUICK="${QUICK:-0}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT/logs" "$OUT/data"
OUT="$(cd "$OUT" && pwd)"
# A new run folder per invocation, because the trainers stop rather than overwrite a run.
RUNS="$OUT/runs/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUNS"

# Time limits in seconds. QUICK runs, meant for a loaded CPU, get three times as long.
scale=1
if [[ "$QUICK" == 1 ]]; then scale=3; fi
limit() {  # limit PART DEFAULT: $LIMIT_<PART> or DEFAULT * scale
    local var="LIMIT_${1^^}"
    echo "${!var:-$(($2 * scale))}"
}

SUMMARY="$OUT/summary.md"
printf '| part | status | seconds | log |\n|---|---|---|---|\n' > "$SUMMARY"
failures=0

run_part() {  # run_part NAME LIMIT COMMAND...: log to $OUT/logs/NAME.log, add a summary row
    local name="$1" seconds="$2"
    shift 2
    local log="$OUT/logs/$name.log" start rc status
    echo "== $name (limit ${seconds} s)"
    start=$(date +%s)
    set +e
    # Through bash -c, so that the exported shell functions below can run under timeout too.
    timeout --kill-after=10 "$seconds" bash -c '"$@"' run_part "$@" > "$log" 2>&1
    rc=$?
    set -e
    case "$rc" in
        0) status=ok ;;
        124|137) status="timed out"; failures=$((failures + 1)) ;;
        *) status="failed (exit $rc)"; failures=$((failures + 1)) ;;
    esac
    tail -n 3 "$log" | sed 's/^/   /'
    printf '| %s | %s | %d | %s |\n' "$name" "$status" "$(($(date +%s) - start))" \
        "logs/$name.log" >> "$SUMMARY"
}

install_wheels() {
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "no wheels in .whl/, nothing to install"
        return 0
    fi
    # --no-deps keeps pip from replacing the machine's torch with another build.
    "$PYTHON" -m pip install --no-index --no-deps --target /tmp/site "${wheels[@]}"
}

make_digits() {
    if [[ -d "$OUT/data/digits256" ]]; then
        echo "reusing $OUT/data/digits256"
        return 0
    fi
    "$PYTHON" tools/digits_to_folder.py "$OUT/data/digits256" --size 256
}

export -f install_wheels make_digits
export PYTHON OUT

if [[ "$QUICK" == 1 ]]; then
    bench_size=(--size tiny --repeats 1 --warmup 1)
    cifar_size=(--arch resnet18 --batch_size 32 --epochs 1 --max_batches 3)
    eigengan_size=(--size 32 --batch 8 --steps 3 --base_channels 8 --max_channels 64
                   --noise_dim 64 --n_sample 4)
    simple_gan_size=(--model gan --width_mult 0.0625 --batch_size 8 --max_steps 3)
else
    bench_size=(--size full --repeats 5 --warmup 2)
    cifar_size=(--arch resnet50 --batch_size 128 --epochs 3 --max_batches 10)
    eigengan_size=(--size 256 --batch 64 --steps 30 --n_sample 16)
    simple_gan_size=(--model gan128 --batch_size 128 --max_steps 30)
fi

run_part wheels "$(limit wheels 30)" install_wheels
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export GPU_TEST_DEVICE="$DEVICE"

run_part environment "$(limit environment 15)" "$PYTHON" -c "
import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda)
print('device', '$DEVICE', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')
print('bf16 supported', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"

run_part tests "$(limit tests 50)" "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -rs \
    --durations=5

run_part benchmark "$(limit benchmark 80)" "$PYTHON" benchmarks/benchmark.py \
    --device "$DEVICE" --sections trainers meta nog "${bench_size[@]}" \
    --markdown "$OUT/benchmark.md" "$@"

run_part data "$(limit data 30)" make_digits

run_part cifar "$(limit cifar 35)" "$PYTHON" main_cifar100.py --dataset digits \
    --norm zcanormbatch --nog --olr --ow "${cifar_size[@]}" --device "$DEVICE" \
    --run_dir "$RUNS/cifar" --workers 2 --no_progress

run_part eigengan "$(limit eigengan 35)" "$PYTHON" eigengan/train_ffhq.py \
    "$OUT/data/digits256" "${eigengan_size[@]}" --reg_type nog_olr --amp bf16 \
    --device "$DEVICE" --n_workers 4 --logdir "$RUNS" --name eigengan \
    --sample_every 1000000 --ckpt_every 1000000 --log_every 5

run_part simple_gan "$(limit simple_gan 35)" "$PYTHON" simple_gan/train.py \
    --dataroot "$OUT/data/digits256" "${simple_gan_size[@]}" --reg_type nog_olr --amp bf16 \
    --device "$DEVICE" --num_threads 4 --checkpoints_dir "$RUNS" --name simple_gan \
    --print_freq 10 --display_freq 1000000 --save_latest_freq 1000000

if [[ -f "$OUT/benchmark.md" ]]; then
    echo
    cat "$OUT/benchmark.md"
fi
echo
cat "$SUMMARY"
if (( failures > 0 )); then
    echo "$failures part(s) failed or timed out; see $OUT/logs"
    exit 1
fi
