"""EigenGAN training state: networks, optimizers, gradient scalers, checkpoints and resume.

A checkpoint stores everything that a resumed run needs to continue bit for bit: the weights
of ``G``, ``D`` and ``G_ema``, both Adam states, the NOG/OLR counters, the fp16 loss scales and
the random state of every rank. The data position follows from the step count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from eigengan.model import Discriminator, Generator
from models.amp import make_grad_scaler
from models.distributed import DistContext, rank_seed
from models.gan import make_ema
from models.orthogonality import OrthogonalUpdate, split_param_groups
from models.runs import (UserError, get_rng_state, load_checkpoint, save_checkpoint,
                         seed_everything, set_rng_state, to_plain)


@dataclass
class GANState:
    """The networks, optimizers and gradient scalers that a step changes and a checkpoint saves.

    ``orth`` applies NOG and OLR to the bases ``U`` of ``G``. ``g_scaler`` and ``d_scaler``
    scale the losses under ``--amp fp16`` and pass everything through otherwise.
    """
    G: Generator
    D: Discriminator
    G_ema: AveragedModel
    g_optim: torch.optim.Optimizer
    d_optim: torch.optim.Optimizer
    orth: OrthogonalUpdate
    g_scaler: torch.amp.GradScaler
    d_scaler: torch.amp.GradScaler


def build_models(args, device):
    """Return ``G``, ``D`` and ``G_ema`` on ``device``."""
    G = Generator(args.size, args.n_basis, args.noise_dim, args.base_channels,
                  args.max_channels).to(device)
    D = Discriminator(args.size, args.base_channels, args.max_channels).to(device)
    if args.channels_last:
        G = G.to(memory_format=torch.channels_last)
        D = D.to(memory_format=torch.channels_last)
    # Decay 0.5 ** (batch / 10k), with the global batch: the EMA's half-life is 10,000 images.
    G_ema = make_ema(G, decay=0.5 ** (args.batch / 10_000))
    return G, D, G_ema


def build_optimizers(args, G, D):
    """Return the Adam optimizers and the NOG/OLR hook; every ``U`` gets its own group."""
    bases = G.subspace_bases()
    g_optim = torch.optim.Adam(split_param_groups(G.parameters(), bases), lr=args.lr,
                               betas=(0.5, 0.99))
    d_optim = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.99))
    orth = OrthogonalUpdate(g_optim, bases, nog='nog' in args.reg_type,
                            olr='olr' in args.reg_type)
    return g_optim, d_optim, orth


def build_state(args, device) -> GANState:
    """Build the networks, optimizers and scalers (seed the RNG first for a fixed init)."""
    G, D, G_ema = build_models(args, device)
    g_optim, d_optim, orth = build_optimizers(args, G, D)
    return GANState(G, D, G_ema, g_optim, d_optim, orth,
                    g_scaler=make_grad_scaler(args.amp, device),
                    d_scaler=make_grad_scaler(args.amp, device))


def gather_rng_states(ctx: DistContext) -> list[dict] | None:
    """Return the random state of every rank, in rank order (None for a single process).

    A collective: every rank must call it at the same step.
    """
    if not ctx.is_distributed:
        return None
    states = [None] * ctx.world_size
    dist.all_gather_object(states, get_rng_state())
    return states


def checkpoint_state(args, step: int, s: GANState, rng_per_rank: list[dict] | None = None,
                     data_position: dict | None = None) -> dict:
    """Return everything a resumed run needs, as weights_only-loadable plain data.

    ``rng`` is the random state of rank 0, and ``rng_per_rank`` that of every rank of a
    multi-process run. ``data_position`` (epoch and batches done in it) is stored for reading
    only: a resumed run derives the same position from ``step``.
    """
    state = {'step': step, 'arch': s.G.arch(), 'options': to_plain(vars(args)),
             'G': s.G.state_dict(), 'D': s.D.state_dict(), 'G_ema': s.G_ema.state_dict(),
             'g_optim': s.g_optim.state_dict(), 'd_optim': s.d_optim.state_dict(),
             'orth_update': s.orth.state_dict(), 'rng': get_rng_state(),
             'g_scaler': s.g_scaler.state_dict(), 'd_scaler': s.d_scaler.state_dict(),
             'world_size': 1 if rng_per_rank is None else len(rng_per_rank),
             'finished': step >= (1 if args.dry_run else args.steps)}
    if rng_per_rank is not None:
        state['rng'], state['rng_per_rank'] = rng_per_rank[0], rng_per_rank
    if data_position is not None:
        state['data_position'] = data_position
    return state


def save_run_checkpoint(run_dir: Path, state: dict, numbered: bool = True) -> Path:
    """Write ``checkpoints/STEP.pt`` (zero-padded, if ``numbered``) and ``checkpoints/last.pt``.

    Each file is written atomically. Returns the path of the last file written.
    """
    folder = run_dir / 'checkpoints'
    folder.mkdir(parents=True, exist_ok=True)
    if numbered:
        save_checkpoint(folder / f"{state['step']:07d}.pt", state)
    save_checkpoint(folder / 'last.pt', state)
    return folder / 'last.pt'


def _load_scaler(scaler: torch.amp.GradScaler, saved: dict | None) -> None:
    # A run started without --amp fp16 saved an empty scaler state, and the scaler then starts
    # from its initial scale.
    if saved:
        scaler.load_state_dict(saved)


def load_resume_checkpoint(args) -> dict:
    """Read ``--ckpt`` and check that the flags build its generator; return the checkpoint.

    Called before the run folder is touched, so that a wrong file changes nothing. Every rank
    reads the file (on several nodes it must be on a shared file system).
    """
    state = load_checkpoint(args.ckpt)
    if 'G_ema' not in state or 'arch' not in state:
        raise UserError(f'--ckpt {args.ckpt} is not an EigenGAN checkpoint of this trainer')
    with torch.device('meta'):  # the architecture only, without memory or random draws
        arch = Generator(args.size, args.n_basis, args.noise_dim, args.base_channels,
                         args.max_channels).arch()
    if state['arch'] != arch:
        raise UserError(f'--ckpt {args.ckpt} contains a generator with {state["arch"]}, but the '
                        f'flags build {arch}; pass the flags the run was started with')
    return state


def resume(args, ctx: DistContext, s: GANState, state: dict) -> int:
    """Load a checkpoint (from ``load_resume_checkpoint``) into the models, optimizers, scalers
    and random generators; return its step.

    Each rank restores its own random state when the checkpoint has one per rank.
    """
    s.G.load_state_dict(state['G'])
    s.D.load_state_dict(state['D'])
    s.G_ema.load_state_dict(state['G_ema'])
    s.g_optim.load_state_dict(state['g_optim'])
    s.d_optim.load_state_dict(state['d_optim'])
    s.orth.load_state_dict(state['orth_update'])
    _load_scaler(s.g_scaler, state.get('g_scaler'))
    _load_scaler(s.d_scaler, state.get('d_scaler'))
    step = int(state['step'])
    per_rank = state.get('rng_per_rank') or [state['rng']]
    if len(per_rank) == ctx.world_size:
        set_rng_state(per_rank[ctx.rank])
    elif ctx.rank == 0:
        set_rng_state(state['rng'])
        print(f'note: --ckpt was written by {len(per_rank)} process(es) and this run has '
              f'{ctx.world_size}, so ranks above 0 draw new noise and the run will differ '
              f'from an uninterrupted one')
    else:
        seed_everything(rank_seed(args.seed + step, ctx.rank))
    return step


def write_checkpoint(args, ctx: DistContext, s: GANState, step: int, position: tuple[int, int],
                     run_dir: Path, numbered: bool) -> None:
    """Gather every rank's random state; rank 0 writes the checkpoint of ``step``.

    ``position`` is (epoch, batches done in it) of the data order after ``step`` steps.
    """
    rng_per_rank = gather_rng_states(ctx)
    if ctx.is_main:
        data_position = {'epoch': position[0], 'batches_done_in_epoch': position[1]}
        save_run_checkpoint(run_dir, checkpoint_state(args, step, s, rng_per_rank,
                                                      data_position), numbered=numbered)
