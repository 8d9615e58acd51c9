"""Device and process placement of the vanilla GAN trainer from --device and --gpu_ids.

``--gpu_ids`` is the pix2pix-style flag of the published command lines, and ``--device`` takes
auto, cpu, cuda or cuda:N. Both end in ``models.distributed.init_distributed``, which under
torchrun gives each process cuda:LOCAL_RANK or the CPU.
"""
from __future__ import annotations

import argparse

import torch

from models.distributed import (DistContext, device_flag_from_gpu_ids, init_distributed,
                                torchrun_environment)
from models.runs import UserError


def gpu_ids_flag(parser: argparse.ArgumentParser, gpu_ids: str) -> str:
    """Turn --gpu_ids into a device flag: 'cpu', 'cuda:k', or under torchrun 'auto'/'cuda'."""
    try:
        ids = [int(part) for part in gpu_ids.split(',') if part.strip()]
    except ValueError:
        ids = []
    if not ids or (min(ids) < 0 and ids != [-1]):
        parser.error(f"--gpu_ids must be comma-separated GPU ids such as 0 or 0,1, or -1 for "
                     f"the CPU, got {gpu_ids!r}")
    if ids == [-1]:
        return 'cpu'
    if not torch.cuda.is_available():
        raise UserError(f"--gpu_ids {gpu_ids} requests a GPU but CUDA is not available "
                        f"(torch {torch.__version__}): pass --gpu_ids -1 or --device cpu")
    if len(ids) > 1 and torchrun_environment() is None:
        print(f"note: --gpu_ids {gpu_ids} lists {len(ids)} GPUs but one process drives one "
              f"GPU; training on cuda:{ids[0]} only (torchrun --nproc_per_node "
              f"{len(ids)} uses all of them)")
        return f'cuda:{ids[0]}'
    return device_flag_from_gpu_ids(gpu_ids)


def resolve_context(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DistContext:
    """Pick the device from --device and --gpu_ids and, under torchrun, join the process group.

    --device wins when it is not auto (only --gpu_ids -1 contradicts it). Otherwise --gpu_ids
    '-1' is the CPU and 'k' is cuda:k. A GPU id without CUDA raises UserError rather than
    falling back to the CPU, and so does any id other than -1, 0 or 0,...,N-1 under torchrun.
    Outside torchrun a list trains on its first GPU, with a note. Without either flag the
    device is cuda (cuda:LOCAL_RANK under torchrun) when CUDA is available, else the CPU.
    """
    gpu_flag = gpu_ids_flag(parser, args.gpu_ids) if args.gpu_ids is not None else None
    if args.device != 'auto':
        if gpu_flag == 'cpu' and args.device != 'cpu':
            parser.error(f"--gpu_ids -1 (CPU) conflicts with --device {args.device}")
        return init_distributed(args.device, flag_name='--device')
    if gpu_flag is None:
        return init_distributed('auto', flag_name='--device')
    return init_distributed(gpu_flag, flag_name='--gpu_ids')
