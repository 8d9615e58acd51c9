#!/usr/bin/env bash
# Train EigenGAN on AnimeFace at 128 x 128, then evaluate the last checkpoint.
#
# Usage: ./run_animeface.sh DATA_ROOT NAME [extra trainer flags...]
#   DATA_ROOT  folder of AnimeFace images (searched recursively)
#   NAME       run name. The run folder is $LOGDIR/NAME, and LOGDIR defaults to runs/ in the
#              repository.
#   extra flags go to eigengan/train_animeface.py, e.g. --reg_type olr or --ckpt PATH to resume.
# Evaluation writes traversals and 10,000 VP pairs to $LOGDIR/NAME/eval and merges FID and PPL
# into $LOGDIR/NAME/metrics.json. A metric whose pretrained weights are absent is skipped
# with one line saying where to put them.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,11p' "$0"
    exit 2
fi
data_root="$1"
name="$2"
shift 2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
logdir="${LOGDIR:-$repo/runs}"
python="${PYTHON:-python}"

"$python" "$repo/eigengan/train_animeface.py" "$data_root" --size 128 --batch 64 --reg_type nog \
    --name "$name" --logdir "$logdir" "$@"

"$python" "$repo/eigengan/test.py" "$logdir/$name/checkpoints/last.pt" \
    --traverse --evaluate_VP --out "$logdir/$name/eval" \
    --evaluate_FID --evaluate_PPL --skip_missing_weights
