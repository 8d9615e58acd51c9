"""EigenGAN training shared by train_ffhq.py and train_animeface.py.

Hinge (or non-saturating, least-squares) loss, lazy R1 on real images, DiffAugment on real and
generated images, generator EMA, and one of the orthogonality treatments of the subspace bases
``U``: NOG (nearest orthogonal gradient), OLR (optimal learning rate), both, or the EigenGAN
penalty ``mean((UUᵀ − I)²)`` (``ol``).

The loop is split into one function per phase, and the data order comes from ``EpochSampler``,
whose position is derived from the step count. A resumed run (``--ckpt``) on a CPU with
``--n_workers 0`` reproduces an uninterrupted run exactly.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from eigengan.model import Discriminator, Generator, d_loss, g_loss, orthogonality_penalty
from models.gan import (EpochSampler, diff_augment, infinite_loader, make_ema, r1_penalty,
                        save_image_grid)
from models.images import ImageFolderDataset
from models.orthogonality import OrthogonalUpdate, orthogonality_error, split_param_groups
from models.runs import (REPO_ROOT, RunLogger, UserError, get_rng_state, load_checkpoint,
                         prepare_run_dir, save_checkpoint, seed_everything, select_device,
                         set_rng_state, to_plain)

REG_TYPES = ('nog', 'olr', 'nog_olr', 'ol', 'none')
ADV_LOSSES = ('hinge', 'non_saturating', 'lsgan')
METHOD_NAMES = {'nog': 'nog', 'olr': 'olr', 'nog_olr': 'nog_olr', 'ol': 'ol', 'none': 'baseline'}


def build_parser(description: str, size: int) -> argparse.ArgumentParser:
    """Return the trainer's argument parser; ``size`` is the dataset's default image size."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('data', type=Path, help='folder of training images (searched recursively)')
    data.add_argument('--size', type=int, default=size, help='image side in pixels (power of 2)')
    data.add_argument('--n_workers', type=int, default=4, help='data loading processes')

    model = parser.add_argument_group('model')
    model.add_argument('--n_basis', type=int, default=6, help='basis vectors per subspace')
    model.add_argument('--noise_dim', type=int, default=512, help='size of the noise ε')
    model.add_argument('--base_channels', type=int, default=16,
                       help='channels at full resolution (doubling per halving)')
    model.add_argument('--max_channels', type=int, default=512, help='channel cap')

    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--batch', type=int, default=64, help='batch size')
    optim.add_argument('--lr', type=float, default=1e-4, help='Adam learning rate of G and D')
    optim.add_argument('--steps', type=int, default=500_000, help='training iterations')
    optim.add_argument('--adv_loss', choices=ADV_LOSSES, default='hinge', help='GAN loss')
    optim.add_argument('--reg_type', choices=REG_TYPES, default='nog',
                       help='treatment of the bases U: nearest orthogonal gradient, optimal '
                            'learning rate, both, orthogonality penalty, or none')
    optim.add_argument('--orth_reg', type=float, default=100.0, help='weight of the ol penalty')
    optim.add_argument('--d_reg', type=float, default=10.0, help='R1 weight γ')
    optim.add_argument('--d_reg_every', type=int, default=16, help='R1 interval in steps')

    log = parser.add_argument_group('logging and checkpoints')
    log.add_argument('--logdir', type=Path, default=REPO_ROOT / 'runs',
                     help='parent folder of run folders')
    log.add_argument('--name', default=None,
                     help='run folder name; None means DATAFOLDER_REGTYPE_seedSEED')
    log.add_argument('--sample_every', type=int, default=1000, help='steps between sample grids')
    log.add_argument('--ckpt_every', type=int, default=10_000, help='steps between checkpoints')
    log.add_argument('--n_sample', type=int, default=64, help='images per sample grid')
    log.add_argument('--log_every', type=int, default=1, help='steps between log records')
    log.add_argument('--fid', action='store_true',
                     help='compute FID of G_ema at every checkpoint (needs Inception weights)')
    log.add_argument('--fid_samples', type=int, default=10_000, help='images per FID estimate')
    log.add_argument('--inception_weights', type=Path, default=None,
                     help='path of pt_inception-2015-12-05-6726825d.pth; None looks in '
                          "torch's hub cache")

    system = parser.add_argument_group('system')
    system.add_argument('--ckpt', type=Path, default=None,
                        help='checkpoint to resume from, in the same run folder')
    system.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    system.add_argument('--seed', type=int, default=0, help='random seed')
    system.add_argument('--dry_run', action='store_true', help='train one step and exit')
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag values that cannot work, with the flag's name."""
    for flag in ('batch', 'steps', 'n_basis', 'noise_dim', 'base_channels', 'max_channels',
                 'sample_every', 'ckpt_every', 'n_sample', 'log_every', 'd_reg_every',
                 'fid_samples'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    if args.size < 8 or args.size & (args.size - 1):
        parser.error(f'--size must be a power of two of at least 8, got {args.size}')
    if args.n_workers < 0 or args.lr <= 0 or args.d_reg < 0 or args.orth_reg < 0:
        parser.error('--n_workers, --d_reg and --orth_reg must be non-negative and --lr positive')
    if args.ckpt is not None and not args.ckpt.is_file():
        parser.error(f'--ckpt {args.ckpt}: file not found')


def run_folder(args: argparse.Namespace) -> Path:
    """Return ``--logdir/--name``, the name defaulting to DATAFOLDER_REGTYPE_seedSEED."""
    name = args.name or f'{args.data.resolve().name}_{args.reg_type}_seed{args.seed}'
    return args.logdir / name


def build_models(args, device):
    """Return ``G``, ``D`` and ``G_ema`` on ``device``."""
    G = Generator(args.size, args.n_basis, args.noise_dim, args.base_channels,
                  args.max_channels).to(device)
    D = Discriminator(args.size, args.base_channels, args.max_channels).to(device)
    # Decay 0.5 ** (batch / 10k): the EMA's half-life is 10,000 images whatever the batch.
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


def make_batches(args, dataset, start_step: int, device):
    """Return an endless iterator of real batches, positioned after ``start_step`` batches."""
    per_epoch = len(dataset) // args.batch
    if per_epoch == 0:
        raise UserError(f'{args.data} has {len(dataset)} readable images, fewer than --batch '
                        f'{args.batch}; lower --batch or add images')
    epoch, within = divmod(start_step, per_epoch)
    sampler = EpochSampler(len(dataset), args.seed, epoch=epoch, start=within * args.batch)
    # The loader's own generator seeds worker processes, so the global RNG is never consumed.
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, drop_last=True,
                        num_workers=args.n_workers, pin_memory=device.type == 'cuda',
                        generator=torch.Generator().manual_seed(args.seed),
                        persistent_workers=False)
    return (batch.to(device, non_blocking=True) for batch in infinite_loader(loader, epoch))


def sample_latents(G, n: int, device, generator=None):
    """Draw training codes ``z ~ N(0, I)`` of shape ``(n, n_blocks, n_basis)`` and noise ``ε``."""
    z = torch.randn(n, G.n_blocks, G.n_basis, generator=generator, device='cpu').to(device)
    eps = torch.randn(n, G.noise_dim, generator=generator, device='cpu').to(device)
    return z, eps


def d_step(args, G, D, d_optim, real_img):
    """Discriminator step on augmented real and generated images; return its loss."""
    with torch.no_grad():
        gen_img = G(*sample_latents(G, real_img.shape[0], real_img.device))
    real_pred = D(diff_augment(real_img))
    gen_pred = D(diff_augment(gen_img))
    loss_D = d_loss(args.adv_loss, real_pred, gen_pred)
    d_optim.zero_grad(set_to_none=True)
    loss_D.backward()
    d_optim.step()
    return loss_D.detach(), real_pred.detach().mean(), gen_pred.detach().mean()


def r1_step(args, D, d_optim, real_img):
    """Lazy R1: ``γ/2 · E‖∇D(x)‖²`` scaled by the interval (Karras et al., arXiv 1912.04958)."""
    real_aug = diff_augment(real_img).detach().requires_grad_(True)
    r1 = r1_penalty(D(real_aug), real_aug)
    d_optim.zero_grad(set_to_none=True)
    (args.d_reg / 2 * r1 * args.d_reg_every).backward()
    d_optim.step()
    return r1.detach()


def g_step(args, G, D, g_optim, orth, batch: int, device):
    """Generator step with NOG/OLR on the bases; return the losses and whether it stepped."""
    D.requires_grad_(False)
    gen_img = G(*sample_latents(G, batch, device))
    loss_G = g_loss(args.adv_loss, D(diff_augment(gen_img)))
    loss_ol = torch.zeros((), device=device)
    if args.reg_type == 'ol':
        loss_ol = orthogonality_penalty(G.subspace_bases()) * args.orth_reg
    g_optim.zero_grad(set_to_none=True)
    (loss_G + loss_ol).backward()
    D.requires_grad_(True)
    # Nearest-orthogonal gradient and optimal learning rate act on every U after backward.
    stepped = orth.apply(args.lr) if (orth.nog or orth.olr) else True
    if stepped:
        g_optim.step()
    return loss_G.detach(), loss_ol.detach(), stepped


def checkpoint_state(args, step, G, D, G_ema, g_optim, d_optim, orth) -> dict:
    """Return everything a resumed run needs, as weights_only-loadable plain data."""
    return {'step': step, 'arch': G.arch(), 'options': to_plain(vars(args)),
            'G': G.state_dict(), 'D': D.state_dict(), 'G_ema': G_ema.state_dict(),
            'g_optim': g_optim.state_dict(), 'd_optim': d_optim.state_dict(),
            'orth_update': orth.state_dict(), 'rng': get_rng_state()}


def save_run_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write ``checkpoints/STEP.pt`` (zero-padded) and ``checkpoints/last.pt``, each atomically."""
    path = run_dir / 'checkpoints' / f"{state['step']:07d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)
    save_checkpoint(path.with_name('last.pt'), state)
    return path


def resume(args, G, D, G_ema, g_optim, d_optim, orth) -> int:
    """Load ``--ckpt`` into the models, optimizers and RNGs; return the step it was saved at."""
    state = load_checkpoint(args.ckpt)
    if 'G_ema' not in state or 'arch' not in state:
        raise UserError(f'--ckpt {args.ckpt} is not an EigenGAN checkpoint of this trainer')
    if state['arch'] != G.arch():
        raise UserError(f'--ckpt {args.ckpt} contains a generator with {state["arch"]}, but the '
                        f'flags build {G.arch()}; pass the flags the run was started with')
    G.load_state_dict(state['G'])
    D.load_state_dict(state['D'])
    G_ema.load_state_dict(state['G_ema'])
    g_optim.load_state_dict(state['g_optim'])
    d_optim.load_state_dict(state['d_optim'])
    orth.load_state_dict(state['orth_update'])
    set_rng_state(state['rng'])
    return int(state['step'])


def step_record(G, orth, losses: dict, stepped: bool) -> dict:
    """Collect the per-step scalars: losses, R1, each U's ‖UUᵀ − I‖, each η*, NOG skips."""
    record = {name: float(value) for name, value in losses.items()}
    for i, U in enumerate(G.subspace_bases()):
        record[f'orth_error/U{i}'] = orthogonality_error(U.detach())
    for i, (eta, used) in enumerate(zip(orth.last['eta'], orth.last['eta_used'])):
        record[f'olr_eta/U{i}'] = eta
        record[f'olr_used/U{i}'] = float(used)
    record['nog_skips'] = orth.skipped
    record['g_stepped'] = float(stepped)
    return record


def train(args, device, argv: list[str] | None = None) -> Path:
    """Run the training loop; return the run folder. ``argv`` is recorded in config.json."""
    run_dir = run_folder(args)
    method = METHOD_NAMES[args.reg_type]
    dataset = ImageFolderDataset(args.data, size=args.size, flip=True)
    # Built before the run folder, so that missing Inception weights leave nothing behind.
    fid = FIDMonitor(args, dataset, device) if args.fid else None
    prepare_run_dir(run_dir, resume=args.ckpt is not None, args=args, argv=argv,
                    family='eigengan', dataset=args.data.resolve().name, method=method,
                    resume_flag='--ckpt')
    seed_everything(args.seed)
    G, D, G_ema = build_models(args, device)
    g_optim, d_optim, orth = build_optimizers(args, G, D)
    # The fixed codes of the sample grids come from their own generator, not the global RNG.
    sample_z = sample_latents(G, args.n_sample, device, torch.Generator().manual_seed(args.seed))
    start = resume(args, G, D, G_ema, g_optim, d_optim, orth) if args.ckpt else 0
    batches = make_batches(args, dataset, start, device)
    logger = RunLogger(run_dir, purge_step=start + 1, purge_key='step')
    last_step = start + 1 if args.dry_run else args.steps
    progress = tqdm(range(start, last_step), initial=start, total=last_step, dynamic_ncols=True)
    tick, last_logged = time.perf_counter(), start

    for step in progress:
        done = step + 1  # completed iterations; the unit of logs, grids and checkpoints

        # fetch batch, then the discriminator step
        real_img = next(batches)
        loss_D, real_score, gen_score = d_step(args, G, D, d_optim, real_img)
        losses = {'loss_D': loss_D, 'D_real': real_score, 'D_gen': gen_score}

        # R1 penalty, lazily every d_reg_every steps
        if step % args.d_reg_every == 0 and args.d_reg > 0:
            losses['r1'] = r1_step(args, D, d_optim, real_img)

        # generator step; nearest-orthogonal gradient and optimal learning rate inside
        loss_G, loss_ol, stepped = g_step(args, G, D, g_optim, orth, args.batch, device)
        losses.update(loss_G=loss_G, loss_ol=loss_ol)

        # EMA of the generator
        G_ema.update_parameters(G)

        # log
        if done % args.log_every == 0 or done == last_step:
            record = step_record(G, orth, losses, stepped)
            now = time.perf_counter()
            record['sec_per_step'] = (now - tick) / (done - last_logged)
            tick, last_logged = now, done
            logger.scalars(done, record)
            logger.stats({'step': done, **record})
            progress.set_postfix(D=f"{record['loss_D']:.3f}", G=f"{record['loss_G']:.3f}",
                                 orth=f"{record['orth_error/U0']:.2e}")

        # sample grid from G_ema on fixed codes
        if done % args.sample_every == 0 or done == last_step:
            with torch.no_grad():
                grid = G_ema.module(*sample_z)
            save_image_grid(grid, run_dir / 'samples' / f'{done:07d}.png',
                            nrow=int(args.n_sample ** 0.5))

        # checkpoint (and FID of G_ema)
        if done % args.ckpt_every == 0 or done == last_step:
            save_run_checkpoint(run_dir, checkpoint_state(args, done, G, D, G_ema, g_optim,
                                                          d_optim, orth))
            if fid is not None:
                fid.log(G_ema.module, done, logger)

    logger.close()
    return run_dir


class FIDMonitor:
    """FID of ``G_ema`` against the training images, logged at every checkpoint."""

    def __init__(self, args, dataset, device):
        from eigengan.evaluate import real_statistics
        from models.metrics import load_inception

        self.model = load_inception(args.inception_weights, device)
        self.args, self.device = args, device
        # Real statistics without random flips, so that they leave the global RNG alone.
        unflipped = copy.copy(dataset)
        unflipped.flip = False
        self.real = real_statistics(unflipped, self.model, args.fid_samples, args.batch, device)

    def log(self, G, step: int, logger: RunLogger) -> None:
        from eigengan.evaluate import generated_fid

        # Seeded per step, so FID draws never move the training RNG.
        value = generated_fid(G, self.real, self.model, self.args.fid_samples, self.args.batch,
                              self.device, torch.Generator().manual_seed(self.args.seed + step))
        logger.scalars(step, {'fid': value})
        logger.stats({'step': step, 'fid': value})


def main(argv: list[str] | None = None, size: int = 256,
         description: str = 'Train EigenGAN.') -> int:
    """Parse flags, train, and print where the run folder is."""
    parser = build_parser(description, size)
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = select_device(args.device)
    run_dir = train(args, device, argv)
    print(f'run folder: {run_dir}')
    return 0
