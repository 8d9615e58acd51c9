#!/usr/bin/env bash
# Train EigenGAN on FFHQ at 256 x 256, then evaluate the last checkpoint.
#
# Usage: ./run_ffhq.sh DATA_ROOT NAME [extra trainer flags...]
#   DATA_ROOT  folder of FFHQ images (searched recursively)
#   NAME       run name. The run folder is $LOGDIR/NAME, and LOGDIR defaults to runs/ in the
#              repository.
#   extra flags go to eigengan/train_ffhq.py, e.g. --reg_type olr or --amp bf16.
# When $LOGDIR/NAME/checkpoints/last.pt exists, training resumes from it (--ckpt), so the same
# command restarts a preempted or requeued job. A SIGTERM or SIGINT sent to this script is
# passed on to the trainer, which finishes its step, writes last.pt and exits. Evaluation then
# waits for a later run that reaches --steps.
# Environment: PYTHON (default python); LOGDIR; NPROC_PER_NODE (default 1; above 1 trains
# with torchrun on that many GPUs of this machine, --batch staying the global batch);
# TORCHRUN_ARGS (torchrun flags for several nodes, used instead of --standalone
# --nproc_per_node); NODE_RANK (default $SLURM_NODEID or 0; only node 0 evaluates).
# Evaluation writes traversals and 10,000 VP pairs to $LOGDIR/NAME/eval and merges FID and PPL
# into $LOGDIR/NAME/metrics.json. A metric whose pretrained weights are absent is skipped
# with one line saying where to put them.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,19p' "$0"
    exit 2
fi
data_root="$1"
name="$2"
shift 2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
logdir="${LOGDIR:-$repo/runs}"
python="${PYTHON:-python}"
last="$logdir/$name/checkpoints/last.pt"

launcher=("$python")
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
    read -ra torchrun_args <<< "$TORCHRUN_ARGS"
    launcher=("$python" -m torch.distributed.run "${torchrun_args[@]}")
elif [[ "${NPROC_PER_NODE:-1}" -gt 1 ]]; then
    launcher=("$python" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE")
fi
resume=()
if [[ -f "$last" ]]; then
    echo "resuming from $last"
    resume=(--ckpt "$last")
fi

# The trainer runs in the background, so that this shell can pass a stop signal on at once
# and then wait for the checkpoint (a foreground job would delay the trap until it ends).
"${launcher[@]}" "$repo/eigengan/train_ffhq.py" "$data_root" --size 256 --batch 64 \
    --reg_type nog --name "$name" --logdir "$logdir" "${resume[@]}" "$@" &
trainer=$!
stop_signal=0
trap 'stop_signal=1; kill -TERM "$trainer" 2>/dev/null || true' TERM INT
while kill -0 "$trainer" 2>/dev/null; do
    wait "$trainer" || true
done
trap - TERM INT
status=0
wait "$trainer" || status=$?
# After a stop signal the trainer exits with status 0, but torchrun itself exits with 1.
if [[ $status -ne 0 && $stop_signal -eq 0 ]]; then
    exit "$status"
fi

# Evaluate only when last.pt has reached --steps.
if [[ ! -f "$last" ]] || ! "$python" -c 'import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=True)
sys.exit(0 if state.get("finished") else 1)' "$last"; then
    echo "training stopped before --steps; run the same command again to resume"
    exit 0
fi
if [[ "${NODE_RANK:-${SLURM_NODEID:-0}}" != 0 ]]; then
    exit 0
fi

"$python" "$repo/eigengan/test.py" "$last" \
    --traverse --evaluate_VP --out "$logdir/$name/eval" \
    --evaluate_FID --evaluate_PPL --skip_missing_weights
