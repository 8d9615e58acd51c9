"""Train EigenGAN on FFHQ at 256 × 256 (Song et al., arXiv 2212.05599, latent disentanglement).

The published run, from this folder or with ``eigengan/`` prefixed from the repository root:

    python train_ffhq.py DATA_ROOT --size 256 --batch 64 --reg_type nog --name ffhq_nog

On 4 GPUs of one machine (``--batch`` stays the global batch, 16 images per GPU):

    torchrun --standalone --nproc_per_node 4 eigengan/train_ffhq.py DATA_ROOT --batch 64 \
        --name NAME

SIGTERM or SIGINT ends the current step, writes RUN_FOLDER/checkpoints/last.pt and exits with
status 0. The same command with ``--ckpt RUN_FOLDER/checkpoints/last.pt`` continues from it.

A CPU smoke run of one step:

    python eigengan/train_ffhq.py DATA_ROOT --size 32 --batch 4 --base_channels 4 \
        --max_channels 16 --noise_dim 16 --n_workers 0 --dry_run --name smoke
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eigengan import trainer  # noqa: E402
from models.runs import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return trainer.main(argv, size=256, description='Train EigenGAN on FFHQ (default 256 px).')


if __name__ == '__main__':
    run_main(main)
