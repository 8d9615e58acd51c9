#!/usr/bin/env bash
#SBATCH --job-name=sgan_dump_lsun
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=4:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=slurm-%x-%j.out
# Write the images of an LSUN LMDB as IMAGE_SIZE PNG files, the real set of FID.
#
# Usage: training_scripts/dump_lsun.sh [LSUN_ROOT [OUT_DIR]] [lmdb_tool.py dump options...]
#   LSUN_ROOT  LSUN LMDB folder (or the environment variable LSUN_ROOT)
#   OUT_DIR    output folder (default: CHECKPOINTS_DIR/lsun_real_IMAGE_SIZE, where
#              test_lsun.sh looks for it); it must not already hold PNG files
# Other environment variables: PYTHON, CHECKPOINTS_DIR, IMAGE_SIZE.
set -euo pipefail

# Under sbatch this file runs from a spool copy: look for the repository in the submit folder
# and its parent too.
for REPO_ROOT in "${REPO_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}" \
    "${SLURM_SUBMIT_DIR:-.}/.."; do
  [[ -f "$REPO_ROOT/training_scripts/common.sh" ]] && break
done
[[ -f "$REPO_ROOT/training_scripts/common.sh" ]] || {
  echo "error: repository not found; set REPO_ROOT to the folder holding training_scripts/" >&2
  exit 2
}
source "$REPO_ROOT/training_scripts/common.sh"

# The data path is the next argument unless it is an option, else $LSUN_ROOT.
if [[ $# -gt 0 && "$1" != -* ]]; then
  LSUN_ROOT="$1"
  shift
fi
[[ -n "${LSUN_ROOT:-}" ]] || die "pass the data path as an argument or set LSUN_ROOT"

out_dir="$CHECKPOINTS_DIR/lsun_real_$IMAGE_SIZE"
if [[ $# -gt 0 && "$1" != -* ]]; then
  out_dir="$1"
  shift
fi
cd "$REPO_ROOT"
"$PYTHON" simple_gan/lmdb_tool.py dump "$LSUN_ROOT" "$out_dir" --dataset_mode lsun \
  --size "$IMAGE_SIZE" "$@"
