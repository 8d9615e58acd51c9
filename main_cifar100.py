"""Train a CIFAR ResNet whose stem norm is the ZCA-whitening SVD meta-layer.

Reproduces the decorrelated batch norm experiments of Song, Sebe and Wang, "Improving
Covariance Conditioning of the SVD Meta-layer by Orthogonality" (ECCV 2022, arXiv 2207.02119).
The network is a ResNet for CIFAR-100 whose first norm whitens the 64 stem channels. The stem
convolution is the pre-SVD layer, and three techniques act on it in any combination: the
nearest orthogonal gradient (--nog), the optimal learning rate (--olr) and an orthogonal
convolution (--ow).

The paper's run (ResNet-50, 350 epochs, on a GPU):
    python main_cifar100.py --norm='zcanormbatch' --batch_size=128 --nog --olr --ow

The same on 4 GPUs (--batch_size stays the global batch, 32 images per GPU):
    torchrun --nproc_per_node 4 main_cifar100.py --norm zcanormbatch --batch_size 128 \
        --nog --olr --ow --sync_cov

A CPU run on scikit-learn's 8x8 digits (no download, a few minutes):
    python main_cifar100.py --dataset digits --arch resnet18 --norm zcanormbatch \
        --nog --olr --ow --epochs 3 --lr 0.02 --batch_size 64

A smoke test that trains one batch, tests one batch and creates no run folder:
    python main_cifar100.py --dataset digits --arch resnet18 --dry_run

Every run writes to --run_dir (default runs/{dataset}_{arch}_{norm}_{method}_seed{seed} in
the repository): config.json, stats.jsonl (one line per epoch), tb/ (TensorBoard), last.pt
(every epoch, and on SIGTERM or SIGINT in the middle of an epoch) and best.pt (best test
accuracy). Repeat the command with --resume to continue, from the next batch after a signal.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from models.amp import add_amp_argument, check_amp, make_grad_scaler
from models.cifar_training import TrainingRun, dry_run, restore_rank_state, train
from models.data import DATASETS, MEAN_STD, NUM_CLASSES, load_datasets
from models.distributed import (DistContext, barrier, cleanup, convert_sync_batchnorm,
                                init_distributed, per_rank_batch, rank_seed, sync_covariance,
                                torchrun_environment, wrap_model)
from models.orthogonality import NOG_METHODS, OrthogonalUpdate, split_param_groups
from models.preemption import PreemptionHandler, ResumableSampler, ignore_stop_signals
from models.resnet import ARCHS, NORMS, STEM_CHANNELS, cifar_resnet
from models.runs import (REPO_ROOT, HelpFormatter, RunLogger, UserError, load_checkpoint,
                         method_name, prepare_run_dir, run_main, seed_everything)
from models.zca import BACKENDS
# With at most this many training steps in a run, --recompute_stats auto recomputes the
# normalisation statistics before each evaluation, because running averages lag a pre-SVD
# weight that moves fast and the whitening magnifies the lag.
RECOMPUTE_MAX_STEPS = 5000

# Options that a resumed run must share with its checkpoint. The others (epochs, device,
# workers, data_root, logging) may change between the original run and the resume.
RESUME_KEYS = ('dataset', 'arch', 'norm', 'groups', 'eps', 'svd_backend', 'nog', 'olr', 'ow',
               'nog_method', 'batch_size', 'lr', 'momentum', 'weight_decay', 'lr_step',
               'lr_gamma', 'seed', 'max_batches')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=HelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', choices=DATASETS, default='cifar100',
                      help='training data; digits is scikit-learn\'s 8x8 digits at 32x32')
    data.add_argument('--data_root', default=str(REPO_ROOT / 'data'),
                      help='folder that contains cifar-100-python/ or cifar-10-batches-py/, '
                           'or receives the download')
    data.add_argument('--no_download', action='store_true',
                      help='fail with a message instead of downloading missing CIFAR data')
    data.add_argument('--workers', type=int, default=2,
                      help='DataLoader worker processes per training process')
    data.add_argument('--no_augment', action='store_true',
                      help='train without random crops and flips (debugging, and comparing '
                           'runs with different numbers of processes)')

    model = parser.add_argument_group('model')
    model.add_argument('--arch', choices=tuple(ARCHS), default='resnet50', help='CIFAR ResNet')
    model.add_argument('--norm', choices=NORMS, default='batchnorm',
                       help='norm after the stem; zcanormbatch is the SVD meta-layer')
    model.add_argument('--groups', type=int, default=1,
                       help=f'channel groups of the meta-layer (must divide {STEM_CHANNELS})')
    model.add_argument('--eps', type=float, default=1e-2,
                       help='eps added to the covariance diagonal in the meta-layer')
    model.add_argument('--svd_backend', choices=BACKENDS, default='svd',
                       help='inverse square root and its backward in the meta-layer')

    method = parser.add_argument_group('orthogonality of the pre-SVD layer (the stem conv)')
    method.add_argument('--nog', action='store_true',
                        help='replace the stem gradient by its nearest orthogonal matrix')
    method.add_argument('--olr', action='store_true',
                        help='use the optimal learning rate eta* for the stem weight')
    method.add_argument('--ow', action='store_true',
                        help='make the stem a skew orthogonal convolution')
    method.add_argument('--nog_method', choices=NOG_METHODS, default='svd',
                        help='how NOG computes the orthogonal polar factor')

    optim = parser.add_argument_group('optimisation (SGD with a step schedule)')
    optim.add_argument('--epochs', type=int, default=350, help='training epochs')
    optim.add_argument('--batch_size', type=int, default=128,
                       help='images per training step over all processes; under torchrun '
                            'each of N processes takes batch_size / N')
    optim.add_argument('--lr', type=float, default=0.1, help='initial learning rate')
    optim.add_argument('--lr_step', type=int, default=100,
                       help='epochs between learning-rate decays')
    optim.add_argument('--lr_gamma', type=float, default=0.1,
                       help='factor applied to the learning rate every --lr_step epochs')
    optim.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    optim.add_argument('--weight_decay', type=float, default=5e-4, help='SGD weight decay')
    optim.add_argument('--recompute_stats', choices=('auto', 'on', 'off'), default='auto',
                       help='recompute norm statistics over the training data before each '
                            f'test; auto: on for runs of at most {RECOMPUTE_MAX_STEPS} steps')

    logs = parser.add_argument_group('run folder and logging')
    logs.add_argument('--run_dir', default=None,
                      help='run folder; None means runs/{dataset}_{arch}_{norm}_{method}_'
                           'seed{seed} in the repository')
    logs.add_argument('--resume', '-r', action='store_true',
                      help='continue the run in --run_dir from its last.pt')
    logs.add_argument('--log_interval', type=int, default=20,
                      help='training steps between TensorBoard points')
    logs.add_argument('--no_progress', action='store_true', help='hide the tqdm progress bar')

    system = parser.add_argument_group('system and debugging')
    system.add_argument('--seed', type=int, default=0, help='random seed')
    system.add_argument('--device', default='auto',
                        help='auto, cpu, cuda or cuda:N; under torchrun auto, cuda or cpu, '
                             'and each process uses cuda:LOCAL_RANK (or the CPU with gloo)')
    system.add_argument('--sync_cov', action='store_true',
                        help='under torchrun, sum the meta-layer covariance moments and the '
                             'batch norm statistics over all processes (SyncBatchNorm), so N '
                             'processes normalise with the global batch as one process does')
    add_amp_argument(system, kept_wide='the meta-layer, NOG and OLR')
    system.add_argument('--channels_last', action='store_true',
                        help='keep weights and images in channels-last memory format')
    system.add_argument('--compile', action='store_true',
                        help='run the training forward through torch.compile (tried on the '
                             'CPU only, where compiling took minutes; testing stays eager)')
    system.add_argument('--dry_run', action='store_true',
                        help='train one batch, test one batch, print the status line and '
                             'exit without creating a run folder')
    system.add_argument('--max_batches', type=int, default=0,
                        help='debugging: at most this many batches per epoch for training, '
                             'recomputation and testing (0: all)')
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject invalid flag values with a message naming the flag."""
    positive = {'batch_size': args.batch_size, 'epochs': args.epochs, 'lr': args.lr,
                'lr_step': args.lr_step, 'lr_gamma': args.lr_gamma, 'eps': args.eps,
                'log_interval': args.log_interval}
    for name, value in positive.items():
        if value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    non_negative = {'momentum': args.momentum, 'weight_decay': args.weight_decay,
                    'workers': args.workers, 'max_batches': args.max_batches}
    for name, value in non_negative.items():
        if value < 0:
            parser.error(f"--{name} must be zero or positive, got {value}")
    if args.groups < 1 or STEM_CHANNELS % args.groups:
        parser.error(f"--groups must divide the {STEM_CHANNELS} stem channels "
                     f"(1, 2, 4, 8, 16, 32 or 64), got {args.groups}")
    if args.dry_run and args.resume:
        parser.error("--dry_run creates no run folder, so it cannot be combined with --resume")


def default_run_dir(args: argparse.Namespace) -> Path:
    """Name the run folder after the options, so that the same command finds the same folder."""
    method = method_name(args.nog, args.olr, args.ow)
    name = f'{args.dataset}_{args.arch}_{args.norm}_{method}_seed{args.seed}'
    return REPO_ROOT / 'runs' / name


def make_loaders(args: argparse.Namespace, ctx: DistContext, generator: torch.Generator):
    """Build the training sampler and the training, statistics and test loaders.

    Each epoch's order comes from (--seed, epoch) and is split between the ranks
    (ResumableSampler), and the worker seeds from `generator`, whose state goes into every
    checkpoint. The statistics loader visits the training images, with the training
    augmentation, in a fixed order: split between the ranks with --sync_cov (or alone),
    else whole global batches on rank 0 only (None on the other ranks). Rank 0 reads or
    downloads the data first, and the other ranks then read it.
    """
    mean, std = MEAN_STD[args.dataset]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if args.dataset == 'digits':
        # Flipped digits are other symbols, so digits get a shift of up to 2 pixels only.
        augment = [transforms.RandomCrop(32, padding=2)]
    else:
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    if args.no_augment:
        augment = []
    if not ctx.is_main:
        barrier(ctx)
    train_set, test_set = load_datasets(
        args.dataset, args.data_root, download=not args.no_download,
        train_transform=transforms.Compose(augment + normalize),
        test_transform=transforms.Compose(normalize))
    if ctx.is_main:
        barrier(ctx)

    per_batch = per_rank_batch(args.batch_size, ctx.world_size, '--batch_size')
    common = dict(num_workers=args.workers, pin_memory=ctx.device.type == 'cuda',
                  worker_init_fn=ignore_stop_signals)
    sampler = ResumableSampler(train_set, ctx.world_size, ctx.rank, shuffle=True,
                               seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=per_batch, sampler=sampler,
                              generator=generator, **common)
    stats_loader = None
    if args.sync_cov or ctx.world_size == 1:
        # NOTE: the split pads the data with a few repeated images up to a multiple of N.
        stats_sampler = ResumableSampler(train_set, ctx.world_size, ctx.rank, shuffle=False)
        stats_loader = DataLoader(train_set, batch_size=per_batch, sampler=stats_sampler,
                                  **common)
    elif ctx.is_main:
        stats_loader = DataLoader(train_set, batch_size=per_batch * ctx.world_size,
                                  shuffle=False, **common)
    test_loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False, **common)
    return sampler, train_loader, stats_loader, test_loader


def build_optimizer(model: nn.Module, args: argparse.Namespace):
    """Build SGD with the stem weight in a group of its own, and the step schedule.

    The group of `model.pre_svd_param` is chosen by identity and contains only that parameter,
    so OLR can set its learning rate to eta* at every step.
    """
    groups = split_param_groups(model.parameters(), [model.pre_svd_param])
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step, args.lr_gamma)
    return optimizer, scheduler




def build_orthogonal_update(model: nn.Module, optimizer, args) -> OrthogonalUpdate:
    """NOG and OLR on the stem weight.

    Build it after any `optimizer.load_state_dict`, which replaces the parameter group dicts
    that OrthogonalUpdate keeps to set eta*.
    """
    return OrthogonalUpdate(optimizer, [model.pre_svd_param], nog=args.nog, olr=args.olr,
                            nog_method=args.nog_method)


def build_model(args: argparse.Namespace, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """Return the bare model on this rank's device and the module that runs the training forward.

    With --sync_cov the meta-layer sums its moments over the ranks and every plain batch norm
    becomes synchronised. Both happen together because only then do N processes on a split
    batch compute the single-process result. The forward module is the model behind DDP
    (with more than one process) and torch.compile (with --compile).
    """
    model = cifar_resnet(args.arch, NUM_CLASSES[args.dataset], norm=args.norm, ow=args.ow,
                         groups=args.groups, eps=args.eps,
                         svd_backend=args.svd_backend).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_cov:
        model = convert_sync_batchnorm(model, ctx)
        sync_covariance(model)
    forward_model = wrap_model(model, ctx)
    if args.compile:
        forward_model = torch.compile(forward_model)
    return model, forward_model


def load_resume_checkpoint(path: Path, args: argparse.Namespace) -> dict:
    """Load `path` and check that it was trained with the same model and optimiser options."""
    if not path.parent.is_dir():
        raise UserError(f"--resume: the run folder {path.parent} does not exist; drop --resume "
                        f"to start a new run there")
    if not path.is_file():
        raise UserError(f"--resume: {path} not found (the run stopped before its first "
                        f"checkpoint, or this is not a run folder); remove the folder or "
                        f"choose another --run_dir to start a new run")
    state = load_checkpoint(path)
    saved = state.get('options')
    if not isinstance(saved, dict) or not {'epoch', 'model', 'optimizer'} <= state.keys():
        raise UserError(f"--resume: {path} is not a checkpoint of main_cifar100.py")
    current = vars(args)
    differ = [key for key in RESUME_KEYS if saved.get(key) != current[key]]
    if differ:
        was = ' '.join(f'--{key} {saved.get(key)}' for key in differ)
        now = ' '.join(f'--{key} {current[key]}' for key in differ)
        raise UserError(f"--resume: {path} was trained with {was}, but this command sets "
                        f"{now}; repeat the original options or choose another --run_dir")
    return state


def restore(state: dict, path: Path, run: TrainingRun) -> dict | None:
    """Load the model, optimizer, scheduler, loss scale and random states of a checkpoint.

    Returns the running sums of an interrupted epoch (None after a whole epoch).
    """
    try:
        run.model.load_state_dict(state['model'])
        run.optimizer.load_state_dict(state['optimizer'])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"--resume: {path} does not match this model ({err})") from err
    run.scheduler.load_state_dict(state['scheduler'])
    if state.get('scaler'):
        run.scaler.load_state_dict(state['scaler'])
    if not restore_rank_state(state, run.ctx, run.generator):
        seed_everything(rank_seed(run.args.seed + state['global_step'], run.ctx.rank))
    sums = state.get('epoch_sums')
    if sums is None:
        return None
    device = run.ctx.device
    return {**sums, 'loss_sum': sums['loss_sum'].to(device),
            'correct': sums['correct'].to(device)}


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build or resume the run, and train; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args)

    # Reject a new run over an existing folder before any download or training. Every rank
    # checks before the process group forms, so rank 0 cannot have created the folder yet.
    if not args.dry_run and not args.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists and is not empty; pass --resume "
                        f"to continue that run, or choose another --run_dir")
    state = load_resume_checkpoint(run_dir / 'last.pt', args) if args.resume else None
    env = torchrun_environment()
    per_rank_batch(args.batch_size, env['WORLD_SIZE'] if env else 1, '--batch_size')
    ctx = init_distributed(args.device)
    try:
        check_amp(args.amp, ctx.device)
        return train_run(args, argv, run_dir, ctx, state)
    finally:
        cleanup()


def train_run(args: argparse.Namespace, argv: list[str] | None, run_dir: Path,
              ctx: DistContext, state: dict | None) -> int:
    """Build the run on this rank, resume it from `state` if given, and train it."""
    # The model's initialisation comes from --seed on every rank. Augmentation and worker
    # seeds differ between ranks (rank 0 keeps --seed, as a single process does).
    seed_everything(args.seed)
    generator = torch.Generator().manual_seed(rank_seed(args.seed, ctx.rank))
    sampler, train_loader, stats_loader, test_loader = make_loaders(args, ctx, generator)
    model, forward_model = build_model(args, ctx)
    optimizer, scheduler = build_optimizer(model, args)
    if ctx.world_size > 1:
        seed_everything(rank_seed(args.seed, ctx.rank))

    steps_per_epoch = len(train_loader) if args.max_batches == 0 else min(
        len(train_loader), args.max_batches)
    recompute = args.recompute_stats == 'on' or (
        args.recompute_stats == 'auto' and args.epochs * steps_per_epoch <= RECOMPUTE_MAX_STEPS)
    run = TrainingRun(args, ctx, run_dir, model, forward_model, optimizer, scheduler, None,
                      make_grad_scaler(args.amp, ctx.device), generator, sampler, train_loader,
                      stats_loader, test_loader, recompute, steps_per_epoch,
                      RunLogger('', enabled=False))
    if args.dry_run:
        run.updater = build_orthogonal_update(model, optimizer, args)
        return dry_run(run)

    start_epoch, global_step, best_acc, epoch_sums = 0, 0, 0.0, None
    if state is not None:
        if state['epoch'] >= args.epochs:
            if ctx.is_main:
                print(f"{run_dir} has already trained {state['epoch']} epochs; pass a larger "
                      f"--epochs to continue it")
            return 0
        epoch_sums = restore(state, run_dir / 'last.pt', run)
        start_epoch, global_step, best_acc = state['epoch'], state['global_step'], \
            state['best_acc']
        if ctx.is_main:
            steps = epoch_sums['steps'] if epoch_sums else 0
            within = f" and {steps} step{'s' if steps > 1 else ''}" if steps else ''
            print(f"resuming {run_dir} after epoch {start_epoch}{within} (best test accuracy "
                  f"{best_acc:.2f}%)")
    run.updater = build_orthogonal_update(model, optimizer, args)
    if state is not None:
        run.updater.load_state_dict(state['orthogonal_update'])
    if ctx.is_main:
        resolved = argparse.Namespace(**{**vars(args), 'run_dir': str(run_dir)})
        prepare_run_dir(run_dir, args.resume, resolved, argv, family='cifar',
                        dataset=args.dataset, method=method_name(args.nog, args.olr, args.ow))
    barrier(ctx)

    # TensorBoard points and stats.jsonl lines after the checkpoint's step belong to an
    # interrupted run, so the logger drops them.
    purge_step = global_step + 1 if args.resume else None
    with RunLogger(run_dir, purge_step=purge_step, purge_key='step',
                   enabled=ctx.is_main) as run.logger, PreemptionHandler() as run.preemption:
        best_acc, stopped_at = train(run, start_epoch, global_step, best_acc, epoch_sums)
    if ctx.is_main and stopped_at is not None:
        print(f"stopped by {run.preemption.signal_name or 'a signal on another rank'} after "
              f"step {stopped_at}; {run_dir / 'last.pt'} holds the position, continue with "
              f"--resume", flush=True)
    elif ctx.is_main:
        print(f"done: best test accuracy {best_acc:.2f}% in {run_dir}")
    return 0


if __name__ == '__main__':
    run_main(main)
