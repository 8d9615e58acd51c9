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
# EVAL_ARGS: extra flags for eigengan/test.py, e.g. "--n_pairs 1000 --device cuda:1".
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,20p' "$0"
    exit 2
fi
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/eigengan/train_and_evaluate.sh" ffhq "$@"
