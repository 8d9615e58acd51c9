#!/usr/bin/env bash
#SBATCH --job-name=sgan_test_celeba
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=4:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=slurm-%x-%j.out
# Evaluate a trained CelebA run: latent traversals (plain and SeFa), VP pairs and FID.
#
# Usage: training_scripts/test_celeba.sh METHOD [CELEBA_ROOT] [gen_pairs.py options...]
#        sbatch training_scripts/test_celeba.sh METHOD [CELEBA_ROOT]
#   METHOD     the method of the run CHECKPOINTS_DIR/celeba_METHOD (nog, olr, orojar, ...)
#   CELEBA_ROOT aligned CelebA image folder (or CELEBA_ROOT), for the real images of FID
# Writes into the run folder: traversals/ and traversals_sefa/, vp_pairs/ (N_PAIRS pairs,
# labels.npy, codes.npz, samples/), and metrics.json with the FID of vp_pairs/samples against
# the real images at IMAGE_SIZE (prepared once into REAL_DIR). FID is skipped with one line
# when pytorch-fid's Inception weights are not in torch's hub cache.
# Other environment variables (see common.sh): PYTHON, CHECKPOINTS_DIR, DEVICE, IMAGE_SIZE,
# N_PAIRS, MODEL_TYPE, REAL_DIR, VISUALIZE_OPTIONS.
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

parse_method_and_data CELEBA_ROOT "$@"
run_tests celeba "$DATAROOT" "$METHOD" "${ARGS[@]}"
