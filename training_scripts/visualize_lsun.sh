#!/usr/bin/env bash
#SBATCH --job-name=sgan_visualize_lsun
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=2:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=slurm-%x-%j.out
# Latent traversals of every checkpoint of a LSUN Church outdoor run, as grids and GIFs.
#
# Usage: training_scripts/visualize_lsun.sh METHOD [visualize.py options...]
#   METHOD  the method of the run CHECKPOINTS_DIR/lsun_METHOD
# Writes RUN/traversals/CHECKPOINT/ and RUN/traversals_sefa/CHECKPOINT/ (dim_NN.png,
# traversal.gif, frame_NN.png) for each epoch_NNNN.pt and latest.pt of the run.
# Other environment variables: PYTHON, CHECKPOINTS_DIR, DEVICE.
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

[[ $# -ge 1 ]] || die "pass the method of the run as the first argument"
METHOD="$1"
shift
run_dir="$CHECKPOINTS_DIR/lsun_$METHOD"
[[ -d "$run_dir" ]] || die "run folder $run_dir not found"
cd "$REPO_ROOT"
"$PYTHON" simple_gan/visualize.py --model_path "$run_dir" --device "$DEVICE" \
  --directions both "$@"
