"""Training state and steps of the vanilla GAN, kept apart from the command line.

``GANTraining`` contains everything a checkpoint must restore: networks, optimizers, schedulers,
gradient scalers, the NOG/OLR hook, the position in the data order and the random generators.
``discriminator_step`` and ``generator_step`` are one update each, and ``simple_gan/train.py``
drives them.

Under torchrun every rank runs these steps on its own share of the batch. The GAN step has two
or three backward passes (D with its gradient penalty, then G), so instead of wrapping the
networks in DistributedDataParallel each phase averages its gradients with one all-reduce
(``average_gradients``) before NOG, OLR and the optimizer step. Every rank then applies the same
update and the parameters stay identical.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, StepLR

from models.amp import autocast, make_grad_scaler, scaled_backward, step_optimizer
from models.distributed import (DistContext, average_gradients, barrier, broadcast_module,
                                rank_seed)
from models.gan import gradient_penalty
from models.orthogonality import OrthogonalUpdate, orthogonality_error, split_param_groups
from models.preemption import ResumableSampler
from models.runs import (get_rng_state, load_checkpoint, save_checkpoint, seed_everything,
                         set_rng_state)
from simple_gan.losses import discriminator_loss, generator_loss
from simple_gan.networks import Discriminator, Generator, build_networks, pre_svd_weight
from simple_gan.regularizers import REGULARIZERS

REG_TYPES = ('nog', 'olr', 'nog_olr', 'orojar', 'hp', 'none')
LR_POLICIES = ('linear', 'step', 'cosine')
# The regularisers act on the outputs of the generator's first five layers.
REG_LAYERS = 5


def data_order_seed(seed: int) -> int:
    """Seed of the data order: epoch ``e`` is ``randperm`` seeded with ``seed * 1_000_003 + e``.

    This is the rule of ``models.gan.EpochSampler``, which single-process runs used before the
    sampler became rank-aware, so their checkpoints resume with the same data order.
    """
    return seed * 1_000_003


def method_of(reg_type: str) -> str:
    """Name of the method in run folders and result tables ('none' is the baseline)."""
    return 'baseline' if reg_type == 'none' else reg_type


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                   first_epoch: int) -> LRScheduler:
    """Per-epoch learning-rate schedule, stepped once at the end of every epoch.

    ``linear``: constant for the epochs up to ``n_epochs``, then linear decay towards zero over
    ``n_epochs_decay`` epochs; with ``k`` epochs finished the factor is
    ``1 - max(0, k + first_epoch - n_epochs) / (n_epochs_decay + 1)``. ``step``: times 0.1
    every ``lr_decay_iters`` epochs. ``cosine``: cosine annealing to zero over ``n_epochs``.
    """
    if args.lr_policy == 'linear':
        def factor(k: int) -> float:
            return 1.0 - max(0, k + first_epoch - args.n_epochs) / float(args.n_epochs_decay + 1)
        return LambdaLR(optimizer, factor)
    if args.lr_policy == 'step':
        return StepLR(optimizer, step_size=args.lr_decay_iters, gamma=0.1)
    return CosineAnnealingLR(optimizer, T_max=max(1, args.n_epochs), eta_min=0.0)


@dataclass
class GANTraining:
    """Networks, optimizers and counters of one run; ``state_dict`` is its checkpoint.

    ``sampler`` yields this rank's share of each epoch; ``epoch_step`` counts batches of the
    per-rank size. ``d_scaler`` and ``g_scaler`` are enabled only with ``amp == 'fp16'``.
    """
    G: Generator
    D: Discriminator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sched_G: LRScheduler
    sched_D: LRScheduler
    orth: OrthogonalUpdate | None
    sampler: ResumableSampler
    model_config: dict
    first_epoch: int
    d_scaler: torch.amp.GradScaler
    g_scaler: torch.amp.GradScaler
    amp: str = 'off'
    channels_last: bool = False
    ctx: DistContext = field(default_factory=DistContext)
    seed: int = 0
    step: int = 0          # generator steps done
    epoch: int = 1         # epoch in progress, counted from first_epoch
    epoch_step: int = 0    # batches of that epoch done
    last: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def state_dict(self) -> dict:
        """Return the checkpoint. Under torchrun it is a collective (it gathers the RNGs)."""
        state = {
            'G': self.G.state_dict(), 'D': self.D.state_dict(),
            'opt_G': self.opt_G.state_dict(), 'opt_D': self.opt_D.state_dict(),
            'sched_G': self.sched_G.state_dict(), 'sched_D': self.sched_D.state_dict(),
            'd_scaler': self.d_scaler.state_dict(), 'g_scaler': self.g_scaler.state_dict(),
            'orth': self.orth.state_dict() if self.orth is not None else None,
            'model_config': dict(self.model_config), 'first_epoch': self.first_epoch,
            'step': self.step, 'epoch': self.epoch, 'epoch_step': self.epoch_step,
            'data_order': {'seed': self.seed, 'epoch': self.epoch,
                           'epoch_step': self.epoch_step, 'world_size': self.ctx.world_size},
            'rng': get_rng_state(),
        }
        if self.ctx.world_size > 1:
            # Each rank draws its own noise, flips and penalty samples, so a resume needs the
            # generator states of every rank, not only those of rank 0.
            states = [None] * self.ctx.world_size
            dist.all_gather_object(states, state['rng'])
            state['rng_per_rank'] = states
        return state

    def save(self, path: Path) -> None:
        """Write the checkpoint from rank 0. Every rank must call it at the same step."""
        state = self.state_dict()
        if self.ctx.is_main:
            save_checkpoint(path, state)
        barrier(self.ctx)


def build_training(args: argparse.Namespace, n_images: int, device: torch.device,
                   checkpoint: dict | None = None, ctx: DistContext | None = None
                   ) -> GANTraining:
    """Build a fresh run from ``args``, or restore one from ``checkpoint`` (a loaded dict).

    OLR needs the first layer's weight alone in its Adam group. The group is built from that
    parameter object itself, never from a name.
    NOTE: the published code built it from a parameter name lacking ``.weight``, so the group
    was empty and OLR changed nothing.

    With a distributed ``ctx`` the networks are broadcast from rank 0, so all ranks start
    identical, and the random generators are then seeded per rank (or restored per rank from
    ``checkpoint``) so that ranks draw different noise.
    """
    ctx = ctx or DistContext(device=device)
    model_config = {'model': args.model, 'nz': args.nz, 'nc_out': args.nc_out,
                    'width_mult': args.width_mult}
    G, D = build_networks(args.model, args.nz, args.nc_out, args.width_mult)
    G, D = G.to(device), D.to(device)
    if args.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    betas = (args.beta1, 0.999)
    first_weight = pre_svd_weight(G)
    opt_G = torch.optim.Adam(split_param_groups(G.parameters(), [first_weight]),
                             lr=args.lr, betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=betas)
    nog = args.reg_type in ('nog', 'nog_olr')
    olr = args.reg_type in ('olr', 'nog_olr')
    orth = OrthogonalUpdate(opt_G, [first_weight], nog=nog, olr=olr) if nog or olr else None

    first_epoch = checkpoint['first_epoch'] if checkpoint else args.epoch_count
    training = GANTraining(
        G=G, D=D, opt_G=opt_G, opt_D=opt_D,
        sched_G=make_scheduler(opt_G, args, first_epoch),
        sched_D=make_scheduler(opt_D, args, first_epoch),
        orth=orth, model_config=model_config, first_epoch=first_epoch, epoch=first_epoch,
        sampler=ResumableSampler(range(n_images), ctx.world_size, ctx.rank,
                                 seed=data_order_seed(args.seed)),
        d_scaler=make_grad_scaler(args.amp, device), g_scaler=make_grad_scaler(args.amp, device),
        amp=args.amp, channels_last=args.channels_last, ctx=ctx, seed=args.seed)
    if checkpoint is not None:
        restore_training(training, checkpoint)
    if ctx.world_size > 1:
        broadcast_module(G)
        broadcast_module(D)
        if checkpoint is None:
            seed_everything(rank_seed(args.seed, ctx.rank))
    return training


def restore_training(training: GANTraining, state: dict) -> None:
    """Load a checkpoint dict into ``training`` (networks, optimizers, counters, RNG)."""
    training.G.load_state_dict(state['G'])
    training.D.load_state_dict(state['D'])
    training.opt_G.load_state_dict(state['opt_G'])
    training.opt_D.load_state_dict(state['opt_D'])
    training.sched_G.load_state_dict(state['sched_G'])
    training.sched_D.load_state_dict(state['sched_D'])
    if training.orth is not None:
        # Optimizer.load_state_dict replaces the param_group dicts, and OrthogonalUpdate keeps
        # the groups it found at construction, so OLR would set the lr of a discarded group.
        # Building it again on the restored groups keeps OLR working after a resume.
        orth = training.orth
        training.orth = OrthogonalUpdate(training.opt_G, orth.pre_svd, nog=orth.nog,
                                         olr=orth.olr, nog_method=orth.nog_method)
        if state.get('orth') is not None:
            training.orth.load_state_dict(state['orth'])
    for name in ('d_scaler', 'g_scaler'):
        # A checkpoint of an fp16 run resumed with --amp off or bf16 drops the scale.
        if state.get(name) and getattr(training, name).is_enabled():
            getattr(training, name).load_state_dict(state[name])
    training.step = int(state['step'])
    training.epoch = int(state['epoch'])
    training.epoch_step = int(state['epoch_step'])
    restore_rng(training, state)


def restore_rng(training: GANTraining, state: dict) -> None:
    """Restore this rank's random generators, or reseed them when the world size changed.

    The data position ``epoch_step`` counts per-rank batches, so it only carries over to the
    same number of ranks. With another number the run continues at the start of its epoch.
    """
    ctx = training.ctx
    saved_world = int(state.get('data_order', {}).get('world_size', 1))
    per_rank = state.get('rng_per_rank')
    if saved_world == ctx.world_size:
        set_rng_state(per_rank[ctx.rank] if per_rank else state['rng'])
        return
    if ctx.is_main:
        warnings.warn(f"the checkpoint was written by {saved_world} process(es) and is resumed "
                      f"by {ctx.world_size}: epoch {training.epoch} restarts from its first "
                      f"batch and the random generators are reseeded, so the run is not "
                      f"bit-identical to an uninterrupted one")
    training.epoch_step = 0
    seed_everything(rank_seed(training.seed + training.step, ctx.rank))


def load_generator(path, device: torch.device | str = 'cpu', model: str | None = None,
                   nz: int | None = None, nc_out: int | None = None) -> Generator:
    """Build a generator from a checkpoint of ``train.py`` (or a bare ``G`` state dict).

    The architecture comes from the checkpoint's ``model_config``. A bare state dict needs
    ``model``; ``nz`` and ``nc_out`` then default to 30 and 3 and ``width_mult`` is read from
    the first layer's shape. Given values that contradict the checkpoint raise ``UserError``.
    """
    from models.runs import UserError

    state = load_checkpoint(path, map_location='cpu')
    weights = state.get('G', state)
    config = dict(state.get('model_config') or {})
    if not config:
        if model is None:
            raise UserError(f"{path} contains no model_config: pass the architecture "
                            f"(--model_type gan or gan128)")
        first = weights.get('first.weight')
        if first is None:
            raise UserError(f"{path} is not a vanilla GAN generator checkpoint")
        config = {'model': model, 'nz': first.shape[0], 'nc_out': nc_out or 3,
                  'width_mult': first.shape[1] / 1024}
    for name, given in (('model', model), ('nz', nz), ('nc_out', nc_out)):
        if given is not None and given != config[name]:
            raise UserError(f"{path} was trained with {name}={config[name]}, but {given} was "
                            f"requested; pass {config[name]} instead")
    G, _ = build_networks(config['model'], config['nz'], config['nc_out'], config['width_mult'])
    G.load_state_dict(weights)
    return G.to(device).eval()


def random_flip(real_img: Tensor) -> Tensor:
    """Flip each image horizontally with probability 1/2 (global torch RNG, CPU)."""
    flip = torch.rand(real_img.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None].to(real_img.device), real_img.flip(-1),
                       real_img)


def discriminator_step(t: GANTraining, real_img: Tensor, gen_img: Tensor,
                       args: argparse.Namespace) -> dict:
    """Update D once with the adversarial loss plus the WGAN-GP penalty (weight 10)."""
    with autocast(t.device, t.amp):
        real_pred = t.D(real_img).float()
        fake_pred = t.D(gen_img.detach()).float()
    loss_D_real, loss_D_fake = discriminator_loss(real_pred, fake_pred, args.gan_mode)

    # Gradient penalty in float32, outside autocast, because its autograd.grad is a backward
    # pass of its own whose input gradients no fp16 loss scale protects from underflow.
    loss_D_gp = gradient_penalty(t.D, real_img.float(), gen_img.float())
    loss_D = loss_D_real + loss_D_fake + args.gp_weight * loss_D_gp

    # Backward, average over the ranks, unscale (fp16) and step.
    t.opt_D.zero_grad(set_to_none=True)
    scaled_backward(loss_D, t.d_scaler)
    average_gradients(t.D.parameters())
    step_optimizer(t.opt_D, t.d_scaler)
    return {'loss_D': loss_D.item(), 'loss_D_gp': loss_D_gp.item()}


def generator_step(t: GANTraining, z: Tensor, gen_img: Tensor,
                   args: argparse.Namespace) -> dict:
    """Update G once, with OroJaR/Hessian Penalty or NOG/OLR on the first layer."""
    # Adversarial loss; D's parameters need no gradient here.
    t.D.requires_grad_(False)
    with autocast(t.device, t.amp):
        fake_pred = t.D(gen_img).float()
    loss_G_adv = generator_loss(fake_pred, args.gan_mode)
    t.D.requires_grad_(True)

    # OroJaR or Hessian Penalty on the first five layer outputs, weighted by --reg_lambda.
    # Both run in float32 even under --amp: they divide differences of layer outputs by
    # epsilon (0.1) or epsilon^2 (0.01), which magnifies the rounding error of bfloat16
    # (relative 2^-8) 10 or 100 times, to the size of the differences being measured.
    loss_G_reg = torch.zeros((), device=z.device)
    if args.reg_type in REGULARIZERS:
        regularizer = REGULARIZERS[args.reg_type]
        loss_G_reg = regularizer(lambda codes: t.G.features(codes, REG_LAYERS), z.float(),
                                 args.epsilon, args.num_rademacher_samples)
    loss_G = loss_G_adv + args.reg_lambda * loss_G_reg

    # Backward, average over the ranks, then (after fp16 unscaling) NOG replaces the first
    # layer's gradient by its polar factor and OLR sets that layer's lr, on every rank alike.
    t.opt_G.zero_grad(set_to_none=True)
    scaled_backward(loss_G, t.g_scaler)
    average_gradients(t.G.parameters())
    step_optimizer(t.opt_G, t.g_scaler, t.orth, base_lr=t.opt_G.param_groups[0]['lr'])

    record = {'loss_G': loss_G_adv.item(), 'loss_G_reg': loss_G_reg.item(),
              'lr': t.opt_G.param_groups[0]['lr'], 'lr_first': t.opt_G.param_groups[1]['lr'],
              'orth_error': orthogonality_error(pre_svd_weight(t.G).detach())}
    if t.orth is not None:
        record['nog_skips'] = t.orth.skipped
        record['olr_eta'] = t.orth.last['eta'][0] if t.orth.last['eta'] else None
    return record


def train_step(t: GANTraining, real_img: Tensor, args: argparse.Namespace) -> dict:
    """Update D and then G once on a batch, with codes z ~ N(0, I)."""
    z = torch.randn(real_img.shape[0], args.nz, device=real_img.device)
    with autocast(t.device, t.amp):
        gen_img = t.G(z)
    record = discriminator_step(t, real_img, gen_img, args)
    record.update(generator_step(t, z, gen_img, args))
    return record
