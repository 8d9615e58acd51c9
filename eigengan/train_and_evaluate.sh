#!/usr/bin/env bash
# Train EigenGAN with the published settings, then evaluate the last checkpoint. run_ffhq.sh and
# run_animeface.sh at the repository root call this script; their headers describe the
# arguments and the environment variables.
#
# Usage: eigengan/train_and_evaluate.sh {ffhq|animeface} DATA_ROOT NAME [trainer flags...]
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: eigengan/train_and_evaluate.sh {ffhq|animeface} DATA_ROOT NAME [trainer flags...]" >&2
    exit 2
fi
dataset="$1"
data_root="$2"
name="$3"
shift 3
case "$dataset" in
    ffhq) script=train_ffhq.py size=256 ;;
    animeface) script=train_animeface.py size=128 ;;
    *) echo "error: unknown dataset '$dataset'; expected ffhq or animeface" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
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
"${launcher[@]}" "$repo/eigengan/$script" "$data_root" --size "$size" --batch 64 \
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

if [[ -e "$logdir/$name/eval/labels.npy" ]]; then
    echo "evaluation already in $logdir/$name/eval; move that folder away to evaluate again"
    exit 0
fi
read -ra eval_args <<< "${EVAL_ARGS:-}"
"$python" "$repo/eigengan/test.py" "$last" \
    --traverse --evaluate_VP --out "$logdir/$name/eval" \
    --evaluate_FID --evaluate_PPL --skip_missing_weights "${eval_args[@]}"
