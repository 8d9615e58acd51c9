"""Training state and steps of the vanilla GAN, kept apart from the command line.

``GANTraining`` contains everything a checkpoint must restore (networks, optimizers, schedulers,
the NOG/OLR hook, the position in the data order); ``discriminator_step`` and
``generator_step`` are one update each. ``simple_gan/train.py`` drives them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, StepLR

from models.gan import EpochSampler, gradient_penalty
from models.orthogonality import OrthogonalUpdate, orthogonality_error, split_param_groups
from models.runs import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from simple_gan.losses import discriminator_loss, generator_loss
from simple_gan.networks import Discriminator, Generator, build_networks, pre_svd_weight
from simple_gan.regularizers import REGULARIZERS

REG_TYPES = ('nog', 'olr', 'nog_olr', 'orojar', 'hp', 'none')
LR_POLICIES = ('linear', 'step', 'cosine')
# The regularisers act on the outputs of the generator's first five layers.
REG_LAYERS = 5


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
    """Networks, optimizers and counters of one run; ``state_dict`` is its checkpoint."""
    G: Generator
    D: Discriminator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sched_G: LRScheduler
    sched_D: LRScheduler
    orth: OrthogonalUpdate | None
    sampler: EpochSampler
    model_config: dict
    first_epoch: int
    step: int = 0          # generator steps done
    epoch: int = 1         # epoch in progress, counted from first_epoch
    epoch_step: int = 0    # batches of that epoch done
    last: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            'G': self.G.state_dict(), 'D': self.D.state_dict(),
            'opt_G': self.opt_G.state_dict(), 'opt_D': self.opt_D.state_dict(),
            'sched_G': self.sched_G.state_dict(), 'sched_D': self.sched_D.state_dict(),
            'orth': self.orth.state_dict() if self.orth is not None else None,
            'model_config': dict(self.model_config), 'first_epoch': self.first_epoch,
            'step': self.step, 'epoch': self.epoch, 'epoch_step': self.epoch_step,
            'data_order': {'seed': self.sampler.seed, 'epoch': self.epoch,
                           'epoch_step': self.epoch_step},
            'rng': get_rng_state(),
        }

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.state_dict())


def build_training(args: argparse.Namespace, n_images: int, device: torch.device,
                   checkpoint: dict | None = None) -> GANTraining:
    """Build a fresh run from ``args``, or restore one from ``checkpoint`` (a loaded dict).

    OLR needs the first layer's weight alone in its Adam group. The group is built from that
    parameter object itself, never from a name.
    NOTE: the published code built it from a parameter name lacking ``.weight``, so the group
    was empty and OLR changed nothing.
    """
    model_config = {'model': args.model, 'nz': args.nz, 'nc_out': args.nc_out,
                    'width_mult': args.width_mult}
    G, D = build_networks(args.model, args.nz, args.nc_out, args.width_mult)
    G, D = G.to(device), D.to(device)
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
        orth=orth, sampler=EpochSampler(n_images, args.seed), model_config=model_config,
        first_epoch=first_epoch, epoch=first_epoch)
    if checkpoint is not None:
        restore_training(training, checkpoint)
    return training


def restore_training(training: GANTraining, state: dict) -> None:
    """Load a checkpoint dict into ``training`` (networks, optimizers, counters, RNG)."""
    training.G.load_state_dict(state['G'])
    training.D.load_state_dict(state['D'])
    training.opt_G.load_state_dict(state['opt_G'])
    training.opt_D.load_state_dict(state['opt_D'])
    training.sched_G.load_state_dict(state['sched_G'])
    training.sched_D.load_state_dict(state['sched_D'])
    if training.orth is not None and state.get('orth') is not None:
        training.orth.load_state_dict(state['orth'])
    training.step = int(state['step'])
    training.epoch = int(state['epoch'])
    training.epoch_step = int(state['epoch_step'])
    set_rng_state(state['rng'])


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
                            f"given; drop the flag or pass {config[name]}")
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
    real_pred = t.D(real_img)
    fake_pred = t.D(gen_img.detach())
    loss_D_real, loss_D_fake = discriminator_loss(real_pred, fake_pred, args.gan_mode)
    loss_D_gp = gradient_penalty(t.D, real_img, gen_img)
    loss_D = loss_D_real + loss_D_fake + args.gp_weight * loss_D_gp
    t.opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    t.opt_D.step()
    return {'loss_D': loss_D.item(), 'loss_D_gp': loss_D_gp.item()}


def generator_step(t: GANTraining, z: Tensor, gen_img: Tensor,
                   args: argparse.Namespace) -> dict:
    """Update G once, with OroJaR/Hessian Penalty or NOG/OLR on the first layer."""
    # Adversarial loss; D's parameters need no gradient here.
    t.D.requires_grad_(False)
    loss_G_adv = generator_loss(t.D(gen_img), args.gan_mode)
    t.D.requires_grad_(True)

    # OroJaR or Hessian Penalty on the first five layer outputs, weighted by --reg_lambda.
    loss_G_reg = torch.zeros((), device=z.device)
    if args.reg_type in REGULARIZERS:
        regularizer = REGULARIZERS[args.reg_type]
        loss_G_reg = regularizer(lambda codes: t.G.features(codes, REG_LAYERS), z,
                                 args.epsilon, args.num_rademacher_samples)
    loss_G = loss_G_adv + args.reg_lambda * loss_G_reg
    t.opt_G.zero_grad(set_to_none=True)
    loss_G.backward()

    # NOG replaces the first layer's gradient by its polar factor; OLR sets that layer's lr.
    go_ahead = True
    if t.orth is not None:
        go_ahead = t.orth.apply(base_lr=t.opt_G.param_groups[0]['lr'])
    if go_ahead:
        t.opt_G.step()

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
    gen_img = t.G(z)
    record = discriminator_step(t, real_img, gen_img, args)
    record.update(generator_step(t, z, gen_img, args))
    return record
