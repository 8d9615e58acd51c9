"""Train the vanilla GAN with NOG, OLR, OroJaR or the Hessian Penalty on its first layer.

Reproduces the latent-disentanglement experiments of Song, Sebe and Wang, "Orthogonal SVD
Covariance Conditioning and Latent Disentanglement" (TPAMI 2023, arXiv 2212.05599). A
128-pixel GAN is trained on CelebA or LSUN Church. Its first layer (latent to 1024 channels)
gets nearest orthogonal gradients (nog), the optimal learning rate (olr) or both, and is
compared with the OroJaR and Hessian Penalty baselines.

Usage (from simple_gan/ or from the repository root):
    python train.py --dataset_mode celeba --model gan128 --nz 30 --reg_type nog \\
        --dataroot CELEBA_ROOT --name celeba_nog
    python simple_gan/train.py --dataset_mode lsun --model gan128 --reg_type orojar \\
        --dataroot church_outdoor_train_lmdb --name lsun_orojar
    # 8 GPUs of one node; --batch_size stays the global batch (16 images per GPU)
    torchrun --nproc_per_node 8 simple_gan/train.py --dataset_mode celeba --model gan128 \\
        --reg_type nog --dataroot CELEBA_ROOT --name celeba_nog --amp bf16
    # CPU smoke run: two steps on a small image folder
    python simple_gan/train.py --dataset_mode celeba --model gan --dataroot FOLDER \\
        --device cpu --dry_run --width_mult 0.0625 --batch_size 4

The run folder is --checkpoints_dir/--name. It contains config.json, stats.jsonl, tb/
(TensorBoard), images/ (sample grids from a fixed set of codes), latest.pt (every
--save_latest_freq steps, at each epoch end and on SIGTERM or SIGINT) and epoch_NNNN.pt
(every --save_epoch_freq epochs). --continue_train resumes from latest.pt, at the step and
data position where it was written. Under torchrun only rank 0 writes to the run folder, and
all nodes must see the same --checkpoints_dir.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from models.amp import add_amp_argument, check_amp  # noqa: E402
from models.distributed import (DistContext, all_reduce_mean, barrier,  # noqa: E402
                                cleanup, per_rank_batch, rank_seed, torchrun_environment)
from models.gan import save_image_grid  # noqa: E402
from models.preemption import PreemptionHandler, ignore_stop_signals  # noqa: E402
from models.runs import (HelpFormatter, RunLogger, UserError, load_checkpoint,  # noqa: E402
                         prepare_run_dir, run_main, scratch_run_dir, seed_everything)
from simple_gan.data import DATASET_MODES, make_dataset  # noqa: E402
from simple_gan.devices import resolve_context  # noqa: E402
from simple_gan.losses import GAN_MODES  # noqa: E402
from simple_gan.networks import IMAGE_SIZES  # noqa: E402
from simple_gan.trainer import (LR_POLICIES, REG_TYPES, GANTraining,  # noqa: E402
                                build_training, method_of, random_flip, train_step)

N_FIXED_SAMPLES = 64
# Losses that differ between ranks; the status line shows their mean over the ranks.
RANK_LOSSES = ('loss_D', 'loss_D_gp', 'loss_G', 'loss_G_reg')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--dataroot', required=True,
                      help='CelebA image folder (searched recursively) or LSUN LMDB folder')
    data.add_argument('--dataset_mode', choices=DATASET_MODES, default='celeba',
                      help='celeba: aligned images cropped to 170x170; lsun: LMDB of images')
    data.add_argument('--max_dataset_size', type=int, default=None,
                      help='use only the first N images (default: all)')
    data.add_argument('--num_threads', type=int, default=4, help='data-loader worker processes')

    model = parser.add_argument_group('model')
    model.add_argument('--model', choices=tuple(IMAGE_SIZES), default='gan128',
                       help='gan: 64-pixel networks; gan128: 128-pixel networks')
    model.add_argument('--nz', type=int, default=30, help='latent size')
    model.add_argument('--nc_out', type=int, default=3, help='image channels (3, or 1 for grey)')
    model.add_argument('--width_mult', type=float, default=1.0,
                       help='multiplier of every channel count (1 = published networks; '
                            'small values give tiny networks for tests)')

    reg = parser.add_argument_group('orthogonality and regularisers')
    reg.add_argument('--reg_type', choices=REG_TYPES, default='none',
                     help='nog/olr/nog_olr act on the first layer; orojar and hp are '
                          'penalties; none is the baseline')
    reg.add_argument('--reg_lambda', type=float, default=1e-5,
                     help='weight of the OroJaR or Hessian Penalty term')
    reg.add_argument('--epsilon', type=float, default=0.1,
                     help='finite-difference step of OroJaR and the Hessian Penalty')
    reg.add_argument('--num_rademacher_samples', type=int, default=2,
                     help='Rademacher samples per code for OroJaR and the Hessian Penalty')

    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--batch_size', type=int, default=128,
                       help='images per step over all processes (under torchrun each of N '
                            'processes takes batch_size / N)')
    optim.add_argument('--lr', type=float, default=2e-4, help='Adam learning rate of G and D')
    optim.add_argument('--beta1', type=float, default=0.5, help='Adam beta1 (beta2 is 0.999)')
    optim.add_argument('--gan_mode', choices=GAN_MODES, default='vanilla',
                       help='adversarial loss')
    optim.add_argument('--gp_weight', type=float, default=10.0,
                       help='weight of the gradient penalty on D (0 turns it off)')
    optim.add_argument('--n_epochs', type=int, default=600,
                       help='epochs at the initial learning rate')
    optim.add_argument('--n_epochs_decay', type=int, default=600,
                       help='epochs of linear decay to zero after --n_epochs')
    optim.add_argument('--lr_policy', choices=LR_POLICIES, default='linear',
                       help='learning-rate schedule, stepped per epoch')
    optim.add_argument('--lr_decay_iters', type=int, default=50,
                       help='epochs between the x0.1 steps of --lr_policy step')
    optim.add_argument('--epoch_count', type=int, default=1,
                       help='number of the first epoch of a new run (shifts the linear '
                            'schedule); a resumed run continues from its checkpoint')
    optim.add_argument('--max_steps', type=int, default=0,
                       help='stop after this many generator steps in total (0: no limit)')

    log = parser.add_argument_group('logging and checkpoints')
    log.add_argument('--name', default=None,
                     help='run folder name (default: DATASET_MODEL_METHOD_seedSEED)')
    log.add_argument('--checkpoints_dir', default=str(REPO_ROOT / 'checkpoints'),
                     help='parent folder of run folders')
    log.add_argument('--continue_train', action='store_true',
                     help='resume the run in --checkpoints_dir/--name from latest.pt')
    log.add_argument('--print_freq', type=int, default=100, help='steps between status lines')
    log.add_argument('--display_freq', type=int, default=1000,
                     help='steps between sample grids')
    log.add_argument('--save_latest_freq', type=int, default=5000,
                     help='steps between saves of latest.pt')
    log.add_argument('--save_epoch_freq', type=int, default=5,
                     help='epochs between saves of epoch_NNNN.pt')

    system = parser.add_argument_group('system')
    system.add_argument('--gpu_ids', default=None,
                        help="GPU ids, comma separated, or '-1' for the CPU. Without the "
                             "flag: GPU 0 when CUDA is available, else the CPU. A GPU id "
                             "without CUDA is an error. One process uses the first id; "
                             "under torchrun only -1, 0 or 0,...,N-1 are accepted")
    system.add_argument('--device', default='auto',
                        help='auto, cpu, cuda or cuda:N; overrides --gpu_ids when not auto. '
                             'Under torchrun: auto, cuda (cuda:LOCAL_RANK) or cpu (gloo)')
    add_amp_argument(system)
    system.add_argument('--channels_last', action='store_true',
                        help='keep images and 4-D weights in channels-last memory format, '
                             'a GPU speed option whose results match the default format up '
                             'to rounding')
    system.add_argument('--seed', type=int, default=0, help='random seed')
    system.add_argument('--dry_run', action='store_true',
                        help='run two steps in a temporary run folder, removed at the end, '
                             'and exit')
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ('batch_size', 'nz', 'print_freq', 'display_freq', 'save_latest_freq',
                'save_epoch_freq', 'lr_decay_iters')
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.nc_out not in (1, 3):
        parser.error(f"--nc_out must be 3 (RGB) or 1 (grey), got {args.nc_out}")
    if args.num_rademacher_samples < 2:
        parser.error("--num_rademacher_samples must be at least 2 (the penalties are variances)")
    if args.epsilon <= 0 or args.width_mult <= 0 or args.lr <= 0:
        parser.error("--epsilon, --width_mult and --lr must be positive")
    for name in ('n_epochs', 'n_epochs_decay', 'num_threads', 'max_steps'):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.max_dataset_size is not None and args.max_dataset_size < 1:
        parser.error(f"--max_dataset_size must be at least 1, got {args.max_dataset_size}")


def epoch_batches(t: GANTraining, loader: DataLoader, batch_size: int):
    """Iterate over the rest of the epoch in progress (skipping the batches already done)."""
    t.sampler.set_epoch(t.epoch)
    t.sampler.start = t.epoch_step * batch_size
    yield from loader


def end_epoch(t: GANTraining, run_dir: Path, args: argparse.Namespace) -> None:
    # Learning-rate schedules are per epoch; checkpoints every --save_epoch_freq epochs.
    # Every rank calls t.save (it gathers the random generators); rank 0 writes.
    t.sched_G.step()
    t.sched_D.step()
    finished = t.epoch
    t.epoch, t.epoch_step = t.epoch + 1, 0
    if finished % args.save_epoch_freq == 0:
        t.save(run_dir / f'epoch_{finished:04d}.pt')
    t.save(run_dir / 'latest.pt')


def save_samples(t: GANTraining, z_fixed: torch.Tensor, run_dir: Path) -> None:
    # float32 and no autocast, so the grids look the same whatever --amp is.
    with torch.no_grad():
        images = t.G(z_fixed)
    save_image_grid(images, run_dir / 'images' / f'step_{t.step:07d}.png', nrow=8)


def log_status(t: GANTraining, record: dict, seconds: float, logger: RunLogger) -> None:
    """Print one status line and write the record to TensorBoard and stats.jsonl (rank 0).

    Every rank must call it: the losses are averaged over the ranks first.
    """
    if t.ctx.is_distributed:
        record.update(all_reduce_mean({key: record[key] for key in RANK_LOSSES}, t.ctx))
    if not t.ctx.is_main:
        return
    record.update(step=t.step, epoch=t.epoch, time_per_step=seconds)
    print(f"epoch {t.epoch} step {t.step} loss_D {record['loss_D']:.4f} "
          f"loss_G {record['loss_G']:.4f} reg {record['loss_G_reg']:.3e} "
          f"lr {record['lr']:.2e} lr_first {record['lr_first']:.2e} "
          f"orth_error {record['orth_error']:.3f} time {seconds:.3f} s/step", flush=True)
    logger.scalars(t.step, {k: v for k, v in record.items() if isinstance(v, float)})
    logger.stats(record)


def train(t: GANTraining, loader: DataLoader, run_dir: Path, logger: RunLogger,
          args: argparse.Namespace, preemption: PreemptionHandler) -> str:
    """Run the training loop; return why it stopped ('finished', 'max_steps' or a signal).

    Under torchrun every rank runs it in step: the gradient averaging, the status line, the
    checkpoints and the stop check are collectives.
    """
    last_epoch = t.first_epoch + args.n_epochs + args.n_epochs_decay - 1
    # The step to stop at: --max_steps counts from step 0, a dry run's two steps from the
    # resumed step. 0 means no limit.
    max_steps = t.step + 2 if args.dry_run else args.max_steps
    z_fixed = torch.randn(N_FIXED_SAMPLES, args.nz,
                          generator=torch.Generator().manual_seed(args.seed)).to(t.device)
    per_batch = loader.batch_size
    tick, tick_step = time.time(), t.step
    while t.epoch <= last_epoch:
        for real_img in epoch_batches(t, loader, per_batch):
            # Fetch this rank's share of the batch. Flips use the global RNG, which checkpoints
            # save (per rank under torchrun).
            real_img = random_flip(real_img).to(t.device, non_blocking=True)
            if args.nc_out == 1:
                real_img = real_img.mean(dim=1, keepdim=True)
            if args.channels_last:
                real_img = real_img.contiguous(memory_format=torch.channels_last)

            # Discriminator step, then generator step (with NOG/OLR or a regulariser).
            record = train_step(t, real_img, args)
            t.step += 1
            t.epoch_step += 1

            # Status line, TensorBoard scalars and stats.jsonl.
            if t.step % args.print_freq == 0 or t.step == max_steps:
                seconds = (time.time() - tick) / (t.step - tick_step)
                tick, tick_step = time.time(), t.step
                log_status(t, record, seconds, logger)

            # Sample grid (rank 0) and latest checkpoint.
            if t.ctx.is_main and (t.step % args.display_freq == 0 or t.step == max_steps):
                save_samples(t, z_fixed, run_dir)
            if t.step % args.save_latest_freq == 0:
                t.save(run_dir / 'latest.pt')

            # Stop early on --max_steps, --dry_run or a signal. Every rank checks every step,
            # so all of them stop after the same step even when one rank got the signal.
            stop = preemption.stop_requested(t.ctx)
            if stop or (max_steps and t.step >= max_steps):
                t.save(run_dir / 'latest.pt')
                if stop:
                    return preemption.signal_name or 'a signal to another rank'
                return 'max_steps'
        end_epoch(t, run_dir, args)
    return 'finished'


def finished_message(checkpoint: dict, args: argparse.Namespace) -> str | None:
    """Say why a run at ``checkpoint`` has nothing left to train, or return None."""
    if 'step' not in checkpoint or 'epoch' not in checkpoint or 'first_epoch' not in checkpoint:
        raise UserError('latest.pt is not a checkpoint of simple_gan/train.py; move it away or '
                        'choose another --name')
    last_epoch = checkpoint['first_epoch'] + args.n_epochs + args.n_epochs_decay - 1
    if checkpoint['epoch'] > last_epoch:
        return (f"training finished after epoch {checkpoint['epoch'] - 1} (step "
                f"{checkpoint['step']}); raise --n_epochs or --n_epochs_decay to continue it")
    if args.max_steps and checkpoint['step'] >= args.max_steps:
        return (f"already at step {checkpoint['step']}, --max_steps {args.max_steps}; raise "
                f"--max_steps to continue it")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    # Check the batch split before the rendezvous, which would wait for the other processes.
    env = torchrun_environment()
    per_rank_batch(args.batch_size, env['WORLD_SIZE'] if env else 1, '--batch_size')
    ctx = resolve_context(parser, args)
    try:
        return run(args, argv, ctx)
    finally:
        cleanup()


def run(args: argparse.Namespace, argv: list[str] | None, ctx: DistContext) -> int:
    """Set up the data, the run folder and the training state, then train until a stop.

    A dry run writes its run folder into a temporary directory that is removed at the end.
    With --continue_train it starts from the real run folder's latest.pt and leaves it as is.
    """
    check_amp(args.amp, ctx.device)
    per_batch = per_rank_batch(args.batch_size, ctx.world_size, '--batch_size')
    method = method_of(args.reg_type)
    name = args.name or f'{args.dataset_mode}_{args.model}_{method}_seed{args.seed}'
    run_dir = Path(args.checkpoints_dir).expanduser() / name

    # The dataset comes first, so a wrong --dataroot fails before a run folder is created.
    seed_everything(args.seed)
    dataset = make_dataset(args.dataset_mode, args.dataroot, IMAGE_SIZES[args.model],
                           args.max_dataset_size)
    # The checkpoint is read and checked before the run folder is touched, so that a damaged
    # file or a finished run changes nothing.
    checkpoint = None
    if args.continue_train and not (run_dir / 'latest.pt').is_file():
        if ctx.is_main:
            print(f"{run_dir} has no latest.pt yet; starting from step 0")
    elif args.continue_train:
        # Loaded to the CPU: load_state_dict copies the weights and optimizer states to the
        # device, and the saved random states must stay CPU tensors for set_rng_state.
        checkpoint = load_checkpoint(run_dir / 'latest.pt', map_location='cpu')
        done = finished_message(checkpoint, args)
        if done and not args.dry_run:
            if ctx.is_main:
                print(f"{run_dir}: {done}")
            return 0
        if ctx.is_main:
            print(f"resuming {run_dir} at step {checkpoint['step']}, epoch {checkpoint['epoch']}")
    with scratch_run_dir(run_dir, args.dry_run) as out_dir:
        if ctx.is_main:
            prepare_run_dir(out_dir, args.continue_train and not args.dry_run, args, argv,
                            family='simple_gan', dataset=args.dataset_mode, method=method,
                            resume_flag='--continue_train')
        barrier(ctx)
        t = build_training(args, len(dataset), ctx.device, checkpoint, ctx)
        loader = DataLoader(dataset, batch_size=per_batch, sampler=t.sampler,
                            num_workers=args.num_threads, pin_memory=ctx.device.type == 'cuda',
                            drop_last=False,
                            generator=torch.Generator().manual_seed(rank_seed(args.seed,
                                                                              ctx.rank)),
                            worker_init_fn=ignore_stop_signals)

        purge_step = t.step + 1 if checkpoint is not None else None
        with RunLogger(out_dir, purge_step=purge_step, enabled=ctx.is_main,
                       purge_key='step') as logger, PreemptionHandler() as preemption:
            reason = train(t, loader, out_dir, logger, args, preemption)
        if reason == 'finished':
            t.save(out_dir / 'latest.pt')
        barrier(ctx)
    if ctx.is_main and args.dry_run:
        print(f"dry run: {t.step - (checkpoint or {}).get('step', 0)} steps ran; the run folder "
              f"was temporary and has been removed, {run_dir} is untouched")
    elif ctx.is_main and reason == 'finished':
        print(f"finished after epoch {t.epoch - 1} (step {t.step}); checkpoint "
              f"{run_dir / 'latest.pt'}")
    elif ctx.is_main and reason == 'max_steps':
        print(f"stopped at --max_steps {args.max_steps} (step {t.step}, in epoch {t.epoch}); "
              f"continue with --continue_train and a larger --max_steps")
    elif ctx.is_main:
        print(f"stopped by {reason} after step {t.step}; {run_dir / 'latest.pt'} holds the "
              f"position, continue with --continue_train")
    return 0


if __name__ == '__main__':
    run_main(main)
