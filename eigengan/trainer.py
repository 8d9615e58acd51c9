"""EigenGAN training shared by train_ffhq.py and train_animeface.py.

Hinge (or non-saturating, least-squares) loss, lazy R1 on real images, DiffAugment on real and
generated images, generator EMA, and one of the orthogonality treatments of the subspace bases
``U``: NOG (nearest orthogonal gradient), OLR (optimal learning rate), both, or the EigenGAN
penalty ``mean((UUᵀ − I)²)`` (``ol``).

One process, or one process per GPU under ``torchrun`` (``--batch`` is then the global batch,
split evenly). The GAN has three backward passes per step (D, lazy R1 with a double backward,
G with D frozen), so the ranks average gradients explicitly after each phase instead of
wrapping the models in DistributedDataParallel. NOG and OLR then act on the same averaged
gradient on every rank, and the models stay identical without further communication.

The data order comes from a ``ResumableSampler`` whose position is derived from the step count.
SIGTERM or SIGINT ends the current step, writes ``checkpoints/last.pt`` and exits with status 0.
A run resumed from it with ``--ckpt`` (CPU, ``--n_workers 0``, the same number of processes)
reproduces an uninterrupted run exactly.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from eigengan.model import d_loss, g_loss, orthogonality_penalty
from eigengan.state import (GANState, build_state, load_resume_checkpoint, resume,
                            write_checkpoint)
from models.amp import add_amp_argument, autocast, check_amp, scaled_backward, step_optimizer
from models.distributed import (DistContext, all_reduce_mean, any_rank, average_gradients,
                                barrier, broadcast_module, cleanup, init_distributed,
                                per_rank_batch, rank_seed, torchrun_environment)
from models.gan import diff_augment, infinite_loader, r1_penalty, save_image_grid
from models.images import ImageFolderDataset
from models.orthogonality import orthogonality_error
from models.preemption import (PreemptionHandler, ignore_stop_signals,
                               make_resumable_sampler, resume_position)
from models.runs import (REPO_ROOT, HelpFormatter, RunLogger, UserError, prepare_run_dir,
                         scratch_run_dir, seed_everything)

REG_TYPES = ('nog', 'olr', 'nog_olr', 'ol', 'none')
ADV_LOSSES = ('hinge', 'non_saturating', 'lsgan')
METHOD_NAMES = {'nog': 'nog', 'olr': 'olr', 'nog_olr': 'nog_olr', 'ol': 'ol', 'none': 'baseline'}
# Epoch e of the data order is seeded with seed * DATA_SEED_STRIDE + e, so that the epochs of
# runs with nearby seeds do not share permutations (models.gan.EpochSampler uses the same rule).
DATA_SEED_STRIDE = 1_000_003


def build_parser(description: str, size: int) -> argparse.ArgumentParser:
    """Return the trainer's argument parser; ``size`` is the dataset's default image size."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=HelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('data', type=Path, help='folder of training images (searched recursively)')
    data.add_argument('--size', type=int, default=size, help='image side in pixels (power of 2)')
    data.add_argument('--n_workers', type=int, default=4,
                      help='data loading processes (per torchrun process)')

    model = parser.add_argument_group('model')
    model.add_argument('--n_basis', type=int, default=6, help='basis vectors per subspace')
    model.add_argument('--noise_dim', type=int, default=512, help='size of the noise ε')
    model.add_argument('--base_channels', type=int, default=16,
                       help='channels at full resolution (doubling per halving)')
    model.add_argument('--max_channels', type=int, default=512, help='channel cap')

    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--batch', type=int, default=64,
                       help='global batch size; under torchrun each of the N processes takes '
                            'batch / N')
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
                        help='checkpoint to resume from, in the same run folder; after a '
                             'SIGTERM or SIGINT this is RUN_FOLDER/checkpoints/last.pt')
    system.add_argument('--device', default='auto',
                        help="'auto', 'cpu', 'cuda' or 'cuda:N'; under torchrun 'auto' or "
                             "'cuda' (each process uses cuda:LOCAL_RANK) or 'cpu' (gloo)")
    add_amp_argument(system)
    system.add_argument('--channels_last', action='store_true',
                        help='store the convolution weights of G and D in channels-last '
                             'memory format (faster convolutions on recent GPUs)')
    system.add_argument('--seed', type=int, default=0, help='random seed')
    system.add_argument('--dry_run', action='store_true',
                        help='train one step in a temporary run folder, removed at the end, '
                             'and exit')
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


def make_batches(args, ctx: DistContext, dataset, start_step: int, per_batch: int):
    """Return an endless iterator of this rank's real batches and the batches per epoch.

    The iterator starts after ``start_step`` batches. Every rank draws the same permutation of
    an epoch and takes every N-th index of it, so the N per-rank batches of a step hold the
    images of one global batch of a single process.
    """
    sampler = make_resumable_sampler(dataset, ctx, seed=args.seed * DATA_SEED_STRIDE,
                                     drop_last=True)
    per_epoch = sampler.num_samples // per_batch
    if per_epoch == 0:
        raise UserError(f'{args.data} has {len(dataset)} readable images, fewer than --batch '
                        f'{args.batch}; lower --batch or add images')
    epoch, start = resume_position(start_step, per_epoch, per_batch)
    sampler.set_start(start)
    # The loader's own generator seeds the worker processes (differently on each rank), so
    # the global RNG is never consumed.
    worker_seed = rank_seed(args.seed, ctx.rank)
    loader = DataLoader(dataset, batch_size=per_batch, sampler=sampler, drop_last=True,
                        num_workers=args.n_workers, pin_memory=ctx.device.type == 'cuda',
                        generator=torch.Generator().manual_seed(worker_seed),
                        worker_init_fn=ignore_stop_signals, persistent_workers=False)
    batches = (batch.to(ctx.device, non_blocking=True)
               for batch in infinite_loader(loader, epoch))
    return batches, per_epoch


def sample_latents(G, n: int, device, generator=None):
    """Draw training codes ``z ~ N(0, I)`` of shape ``(n, n_blocks, n_basis)`` and noise ``ε``."""
    z = torch.randn(n, G.n_blocks, G.n_basis, generator=generator, device='cpu').to(device)
    eps = torch.randn(n, G.noise_dim, generator=generator, device='cpu').to(device)
    return z, eps


def d_step(args, s: GANState, real_img):
    """Discriminator step on augmented real and generated images; return its loss."""
    device = real_img.device
    with torch.no_grad(), autocast(device, args.amp):
        gen_img = s.G(*sample_latents(s.G, real_img.shape[0], device))
    with autocast(device, args.amp):
        # The losses are formed in float32 from the logits.
        real_pred = s.D(diff_augment(real_img)).float()
        gen_pred = s.D(diff_augment(gen_img)).float()
    loss_D = d_loss(args.adv_loss, real_pred, gen_pred)
    s.d_optim.zero_grad(set_to_none=True)
    scaled_backward(loss_D, s.d_scaler)
    average_gradients(s.D.parameters())
    step_optimizer(s.d_optim, s.d_scaler)
    return loss_D.detach(), real_pred.detach().mean(), gen_pred.detach().mean()


def r1_step(args, s: GANState, real_img):
    """Lazy R1: ``γ/2 · E‖∇D(x)‖²`` scaled by the interval (Karras et al., arXiv 1912.04958).

    The penalty runs in float32 outside autocast: in float16 the input gradient ``∇D(x)`` and
    its square can underflow or overflow, and loss scaling would not reach that inner gradient.
    Its backward still goes through ``d_scaler`` (a float32 multiplication by the scale), so
    that ``unscale_`` in ``step_optimizer`` returns the true gradient.
    """
    real_aug = diff_augment(real_img).detach().requires_grad_(True)
    r1 = r1_penalty(s.D(real_aug), real_aug)
    s.d_optim.zero_grad(set_to_none=True)
    scaled_backward(args.d_reg / 2 * r1 * args.d_reg_every, s.d_scaler)
    average_gradients(s.D.parameters())
    step_optimizer(s.d_optim, s.d_scaler)
    return r1.detach()


def g_step(args, s: GANState, batch: int, device):
    """Generator step with NOG/OLR on the bases; return the losses and whether it stepped."""
    s.D.requires_grad_(False)
    with autocast(device, args.amp):
        gen_img = s.G(*sample_latents(s.G, batch, device))
        gen_pred = s.D(diff_augment(gen_img)).float()
    loss_G = g_loss(args.adv_loss, gen_pred)
    loss_ol = torch.zeros((), device=device)
    if args.reg_type == 'ol':
        # Outside autocast: UUᵀ − I in half precision would lose the small deviations.
        loss_ol = orthogonality_penalty(s.G.subspace_bases()) * args.orth_reg
    s.g_optim.zero_grad(set_to_none=True)
    scaled_backward(loss_G + loss_ol, s.g_scaler)
    s.D.requires_grad_(True)
    # Averaged before NOG and OLR, so that every rank orthogonalises the same gradient.
    # step_optimizer unscales it first and skips the step when it is zero or not finite.
    average_gradients(s.G.parameters())
    orth = s.orth if (s.orth.nog or s.orth.olr) else None
    stepped = step_optimizer(s.g_optim, s.g_scaler, orth, base_lr=args.lr)
    return loss_G.detach(), loss_ol.detach(), stepped


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


def open_run_folder(args, ctx: DistContext, run_dir: Path, dataset, argv):
    """On rank 0, set up FID and the run folder; return the FID monitor (None elsewhere).

    Every rank learns of an error on rank 0 and raises UserError too, so none of them waits
    in a later collective for a rank that has stopped.
    """
    fid, error = None, None
    if ctx.is_main:
        try:
            # Built before the run folder, so that missing Inception weights leave nothing.
            fid = FIDMonitor(args, dataset, ctx.device) if args.fid else None
            prepare_run_dir(run_dir, resume=args.ckpt is not None and not args.dry_run,
                            args=args, argv=argv,
                            family='eigengan', dataset=args.data.resolve().name,
                            method=METHOD_NAMES[args.reg_type], resume_flag='--ckpt')
        except UserError as err:
            error = err
    if any_rank(error is not None, ctx):
        raise error or UserError(f'rank 0 could not set up the run folder {run_dir}; see its '
                                 f'error message')
    return fid


@dataclass
class RunOutputs:
    """Outputs of rank 0: the run folder, its logger, the FID monitor and the grids' codes."""
    run_dir: Path
    logger: RunLogger
    fid: FIDMonitor | None
    sample_z: tuple


def train(args, ctx: DistContext, argv: list[str] | None = None) -> Path:
    """Run the training loop; return the run folder. ``argv`` is recorded in config.json.

    A dry run writes its run folder into a temporary directory that is removed at the end.
    """
    run_dir = run_folder(args)
    checkpoint = load_resume_checkpoint(args) if args.ckpt else None
    if checkpoint is not None and checkpoint['step'] >= args.steps and not args.dry_run:
        if ctx.is_main:
            print(f"--ckpt {args.ckpt} is at step {checkpoint['step']} of --steps {args.steps}, "
                  f"so training is finished; pass a larger --steps to continue it")
        return run_dir
    with scratch_run_dir(run_dir, args.dry_run) as out_dir:
        train_into(args, ctx, argv, out_dir, checkpoint)
        # Rank 0 removes a dry run's folder only when every rank is done with it.
        barrier(ctx)
    return run_dir


def train_into(args, ctx: DistContext, argv: list[str] | None, run_dir: Path,
               checkpoint: dict | None) -> None:
    """Train with ``run_dir`` as the run folder, from ``checkpoint`` when given (see ``train``)."""
    per_batch = per_rank_batch(args.batch, ctx.world_size, '--batch')
    dataset = ImageFolderDataset(args.data, size=args.size, flip=True)
    fid = open_run_folder(args, ctx, run_dir, dataset, argv)

    # The same initialisation on every rank, from --seed.
    seed_everything(args.seed)
    s = build_state(args, ctx.device)
    # The fixed codes of the sample grids come from their own generator, not the global RNG.
    sample_z = sample_latents(s.G, args.n_sample, ctx.device,
                              torch.Generator().manual_seed(args.seed))
    # Noise and flips differ per rank. Rank 0 continues the stream of a single-process run.
    if ctx.rank > 0:
        seed_everything(rank_seed(args.seed, ctx.rank))
    start = resume(args, ctx, s, checkpoint) if checkpoint is not None else 0
    for module in (s.G, s.D, s.G_ema):
        broadcast_module(module)

    batches, per_epoch = make_batches(args, ctx, dataset, start, per_batch)
    logger = RunLogger(run_dir, purge_step=start + 1, enabled=ctx.is_main, purge_key='step')
    out = RunOutputs(run_dir, logger, fid, sample_z)
    try:
        with PreemptionHandler() as preemption:
            train_loop(args, ctx, s, batches, start, per_epoch, out, preemption)
    finally:
        # Closing the iterator shuts the loader workers down at once, also after an error.
        batches.close()
        logger.close()


def train_loop(args, ctx: DistContext, s: GANState, batches, start: int, per_epoch: int,
               out: RunOutputs, preemption: PreemptionHandler) -> int:
    """Train from step ``start`` to ``--steps`` or to a stop signal; return the steps done."""
    last_step = start + 1 if args.dry_run else args.steps
    progress = tqdm(range(start, last_step), initial=start, total=last_step, dynamic_ncols=True,
                    disable=not ctx.is_main)
    tick, last_logged, done = time.perf_counter(), start, start

    for step in progress:
        done = step + 1  # completed iterations; the unit of logs, grids and checkpoints

        # fetch batch, then the discriminator step
        real_img = next(batches)
        loss_D, real_score, gen_score = d_step(args, s, real_img)
        losses = {'loss_D': loss_D, 'D_real': real_score, 'D_gen': gen_score}

        # R1 penalty, lazily every d_reg_every steps
        if step % args.d_reg_every == 0 and args.d_reg > 0:
            losses['r1'] = r1_step(args, s, real_img)

        # generator step; nearest-orthogonal gradient and optimal learning rate inside
        loss_G, loss_ol, stepped = g_step(args, s, real_img.shape[0], ctx.device)
        losses.update(loss_G=loss_G, loss_ol=loss_ol)

        # EMA of the generator
        s.G_ema.update_parameters(s.G)

        # log the losses averaged over the ranks (one all-reduce); rank 0 writes
        if done % args.log_every == 0 or done == last_step:
            record = step_record(s.G, s.orth, all_reduce_mean(losses, ctx), stepped)
            now = time.perf_counter()
            record['sec_per_step'] = (now - tick) / (done - last_logged)
            tick, last_logged = now, done
            out.logger.scalars(done, record)
            out.logger.stats({'step': done, **record})
            progress.set_postfix(D=f"{record['loss_D']:.3f}", G=f"{record['loss_G']:.3f}",
                                 orth=f"{record['orth_error/U0']:.2e}")

        # sample grid from G_ema on fixed codes
        if ctx.is_main and (done % args.sample_every == 0 or done == last_step):
            with torch.no_grad():
                grid = s.G_ema.module(*out.sample_z)
            save_image_grid(grid, out.run_dir / 'samples' / f'{done:07d}.png',
                            nrow=int(args.n_sample ** 0.5))

        # stop signal: every rank learns whether any rank received one (one all-reduce)
        stop = preemption.stop_requested(ctx)

        # checkpoint and FID of G_ema; after a stop signal only last.pt, without FID
        scheduled = done % args.ckpt_every == 0 or done == last_step
        if scheduled or stop:
            position = resume_position(done, per_epoch, 1)
            write_checkpoint(args, ctx, s, done, position, out.run_dir, numbered=scheduled)
            if out.fid is not None and scheduled and not stop:
                out.fid.log(s.G_ema.module, done, out.logger)
        if stop:
            if ctx.is_main:
                name = preemption.signal_name or 'a stop signal on another rank'
                progress.write(f'stopped by {name} after step {done}; resume with --ckpt '
                               f'{out.run_dir / "checkpoints" / "last.pt"}')
            break
    return done


class FIDMonitor:
    """FID of ``G_ema`` against the training images, logged at every checkpoint by rank 0.

    NOTE: the other ranks wait in their next collective meanwhile. An estimate that takes
    longer than the process group's timeout (10 minutes for NCCL, 30 for gloo, in torch
    2.14) stops the job, so keep ``--fid_samples`` small enough under torchrun.
    """

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


def launch_world_size() -> int:
    """Return torchrun's WORLD_SIZE, or 1 for a plain run, without starting a process group."""
    env = torchrun_environment()
    return 1 if env is None else env['WORLD_SIZE']


def main(argv: list[str] | None = None, size: int = 256,
         description: str = 'Train EigenGAN.') -> int:
    """Parse flags, train (one process, or one of torchrun's), and print the run folder."""
    parser = build_parser(description, size)
    args = parser.parse_args(argv)
    check_args(parser, args)
    # Checked before the process group starts, so that a bad --batch fails on every node
    # at once instead of after the rendezvous.
    per_rank_batch(args.batch, launch_world_size(), '--batch')
    ctx = init_distributed(args.device)
    try:
        check_amp(args.amp, ctx.device)
        run_dir = train(args, ctx, argv)
    finally:
        cleanup()
    if ctx.is_main and args.dry_run:
        print(f'dry run: one step ran; the run folder was temporary and has been removed, '
              f'{run_dir} is untouched')
    elif ctx.is_main:
        print(f'run folder: {run_dir}')
    return 0
