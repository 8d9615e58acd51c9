#!/usr/bin/env bash
#SBATCH --job-name=sgan_train_lsun
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=72:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=slurm-%x-%j.out
# Train the 128-pixel vanilla GAN on LSUN Church outdoor with one method, or resume that run.
#
# Usage: training_scripts/train_lsun.sh METHOD [LSUN_ROOT] [train.py options...]
#        sbatch training_scripts/train_lsun.sh METHOD [LSUN_ROOT] [train.py options...]
#   METHOD     nog, olr or orojar (also nog_olr, hp, none)
#   LSUN_ROOT  LSUN LMDB folder (or the environment variable LSUN_ROOT)
# The run folder is CHECKPOINTS_DIR/lsun_METHOD (default CHECKPOINTS_DIR: checkpoints/ in the
# repository). When it exists the run resumes with --continue_train, so resubmitting the same
# command after a preemption continues it. OroJaR uses --reg_lambda 1e-5, as published for
# LSUN Church outdoor. Other environment variables: PYTHON, CHECKPOINTS_DIR, MODEL_TYPE,
# NPROC_PER_NODE and TORCH_ELASTIC_SHUTDOWN_TIMEOUT (described in common.sh).
#
# Preemption: --signal=B:TERM@300 makes SLURM send SIGTERM to this script 300 s before the time
# limit. The script passes it on to the trainer (or torchrun), which finishes its step, writes
# latest.pt with the step and data position, and exits. The script then exits 0.
# Several GPUs of one node: sbatch --gres=gpu:N with NPROC_PER_NODE=N runs the trainer under
# torchrun. --batch_size stays the global batch, which N must divide.
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

parse_method_and_data LSUN_ROOT "$@"
extra=()
if [[ "$METHOD" == orojar ]]; then
  extra=(--reg_lambda 1e-5)
fi
run_training lsun "$DATAROOT" "$METHOD" "${extra[@]}" "${ARGS[@]}"
