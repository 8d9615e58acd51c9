"""Train a CIFAR ResNet whose stem norm is the ZCA-whitening SVD meta-layer.

Reproduces the decorrelated batch norm experiments of Song, Sebe and Wang, "Improving
Covariance Conditioning of the SVD Meta-layer by Orthogonality" (ECCV 2022, arXiv 2207.02119).
The network is a ResNet for CIFAR-100 whose first norm whitens the 64 stem channels. The stem
convolution is the pre-SVD layer, and three techniques act on it in any combination: the
nearest orthogonal gradient (--nog), the optimal learning rate (--olr) and an orthogonal
convolution (--ow).

The paper's run (ResNet-50, 350 epochs, on a GPU):
    python main_cifar100.py --norm='zcanormbatch' --batch_size=128 --nog --olr --ow

A CPU run on scikit-learn's 8x8 digits (no download, a few minutes):
    python main_cifar100.py --dataset digits --arch resnet18 --norm zcanormbatch \
        --nog --olr --ow --epochs 3 --lr 0.02 --batch_size 64

A smoke test that trains one batch, tests one batch and creates no run folder:
    python main_cifar100.py --dataset digits --arch resnet18 --dry_run

Every run writes to --run_dir (default runs/{dataset}_{arch}_{norm}_{method}_seed{seed} in
the repository): config.json, stats.jsonl (one line per epoch), tb/ (TensorBoard), last.pt
(every epoch) and best.pt (best test accuracy). Repeat the command with --resume to continue.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from models.data import DATASETS, MEAN_STD, NUM_CLASSES, load_datasets
from models.orthogonality import NOG_METHODS, OrthogonalUpdate, split_param_groups
from models.resnet import ARCHS, NORMS, STEM_CHANNELS, cifar_resnet
from models.runs import (REPO_ROOT, RunLogger, UserError, get_rng_state, load_checkpoint,
                         method_name, prepare_run_dir, run_main, save_checkpoint,
                         seed_everything, select_device, set_rng_state)
from models.zca import BACKENDS, recompute_norm_statistics

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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', choices=DATASETS, default='cifar100',
                      help='training data; digits is scikit-learn\'s 8x8 digits at 32x32')
    data.add_argument('--data_root', default=str(REPO_ROOT / 'data'),
                      help='folder that contains cifar-100-python/ or cifar-10-batches-py/, '
                           'or receives the download')
    data.add_argument('--no_download', action='store_true',
                      help='fail with a message instead of downloading missing CIFAR data')
    data.add_argument('--workers', type=int, default=2, help='DataLoader worker processes')

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
    optim.add_argument('--batch_size', type=int, default=128, help='images per training batch')
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
    system.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
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


def make_loaders(args: argparse.Namespace, generator: torch.Generator, pin_memory: bool):
    """Build the training, statistics and test loaders.

    The training loader draws each epoch's shuffling order, and the worker seeds, from
    `generator`, whose state goes into every checkpoint. The statistics loader visits the
    training images, with the training augmentation, in a fixed order.
    """
    mean, std = MEAN_STD[args.dataset]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if args.dataset == 'digits':
        # Flipped digits are other symbols, so digits get a shift of up to 2 pixels only.
        augment = [transforms.RandomCrop(32, padding=2)]
    else:
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    train_set, test_set = load_datasets(
        args.dataset, args.data_root, download=not args.no_download,
        train_transform=transforms.Compose(augment + normalize),
        test_transform=transforms.Compose(normalize))

    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin_memory)
    train_loader = DataLoader(train_set, shuffle=True, generator=generator, **common)
    stats_loader = DataLoader(train_set, shuffle=False, **common)
    test_loader = DataLoader(test_set, shuffle=False, **common)
    return train_loader, stats_loader, test_loader


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


def train_one_epoch(model, loader, optimizer, updater, logger, device, args, epoch,
                    global_step):
    """Train for one epoch and return its summary and the new global step.

    The summary contains the mean training loss, the training accuracy in percent, the number
    of steps, the meta-layer statistics and eta* of the last step, and the fraction of steps
    whose eta* was below the base rate and used (the others fall back to the base rate).
    """
    model.train()
    steps = len(loader) if args.max_batches == 0 else min(len(loader), args.max_batches)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, eta_used_steps = 0, 0
    bar = tqdm(itertools.islice(loader, steps), total=steps, leave=False,
               desc=f'epoch {epoch}', disable=True if args.no_progress else None)
    for images, labels in bar:
        # Fetch batch.
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)

        # Forward.
        logits = model(images)
        loss = F.cross_entropy(logits, labels)

        # Backward.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

        # Nearest-orthogonal gradient (--nog), then the optimal learning rate eta* (--olr)
        # for the stem group, against the scheduled rate of the other parameters.
        base_lr = optimizer.param_groups[0]['lr']
        go_ahead = updater.apply(base_lr)
        if updater.last['eta_used'] and all(updater.last['eta_used']):
            eta_used_steps += 1

        # Step, unless NOG found a gradient without a usable polar factor (NaN, Inf or zero).
        if go_ahead:
            optimizer.step()
        global_step += 1

        # Log: running sums on the device, so there is no host sync except at log points.
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
        if global_step % args.log_interval == 0:
            scalars = step_scalars(model, optimizer, updater, loss.item())
            logger.scalars(global_step, scalars)
            bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                            acc=f"{100.0 * correct.item() / seen:.1f}%")

    summary = {'train_loss': loss_sum.item() / max(seen, 1),
               'train_acc': 100.0 * correct.item() / max(seen, 1), 'steps': steps,
               **meta_stats(model), 'olr_eta': last_eta(updater),
               'olr_eta_used': eta_used_steps / max(steps, 1) if updater.olr else None}
    return summary, global_step


def step_scalars(model, optimizer, updater, loss: float) -> dict[str, float]:
    """TensorBoard scalars of one training step."""
    scalars = {'train/loss': loss, 'orthogonality/nog_skips': updater.skipped,
               'orthogonality/nog_rank_deficient': updater.rank_deficient}
    for index, group in enumerate(optimizer.param_groups):
        scalars[f"lr/{group.get('name', f'group_{index}')}"] = group['lr']
    eta = last_eta(updater)
    if eta is not None:
        scalars['orthogonality/olr_eta'] = eta
    for key, value in meta_stats(model).items():
        if value is not None:
            scalars[f'meta_layer/{key}'] = value
    return scalars


def meta_stats(model) -> dict:
    """Condition number, rank and whitening residual from the meta-layer's last forward."""
    keys = ('kappa', 'kappa_raw', 'rank', 'whitening_residual')
    stats = getattr(model.meta_layer, 'last_stats', None) or {}
    return {key: stats.get(key) for key in keys}


def last_eta(updater) -> float | None:
    """Return the eta* that OLR set at the last step (None without --olr or after a skip)."""
    eta = (updater.last or {}).get('eta') if updater.olr else None
    return eta[0] if eta else None


@torch.no_grad()
def evaluate(model, loader, device, max_batches: int) -> tuple[float, float]:
    """Return the test accuracy in percent and the mean test loss, in evaluation mode."""
    model.eval()
    batches = loader if max_batches == 0 else itertools.islice(loader, max_batches)
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction='sum').item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.shape[0]
    return 100.0 * correct / max(seen, 1), loss_sum / max(seen, 1)


def checkpoint_state(model, optimizer, scheduler, updater, generator, args, epoch,
                     global_step, best_acc) -> dict:
    """Everything a resume needs, as tensors and plain Python values."""
    return {'epoch': epoch, 'global_step': global_step, 'best_acc': best_acc,
            'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'orthogonal_update': updater.state_dict(),
            'rng': get_rng_state(), 'loader_generator': generator.get_state(),
            'options': dict(vars(args))}


def load_resume_checkpoint(path: Path, args: argparse.Namespace) -> dict:
    """Load `path` and check that it was trained with the same model and optimiser options."""
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


def restore(state, path, model, optimizer, scheduler, generator) -> None:
    """Load the model, optimizer, scheduler, shuffling and global random states."""
    try:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"--resume: {path} does not match this model ({err})") from err
    scheduler.load_state_dict(state['scheduler'])
    generator.set_state(state['loader_generator'])
    set_rng_state(state['rng'])


def status_line(epoch: int, epochs: int, record: dict) -> str:
    """Format the status line of an epoch: fixed fields, accuracies in percent.

    The time is the whole epoch's, testing included, and ms/step covers training steps only.
    """
    def sci(value):
        return f'{value:8.2e}' if value is not None else f"{'-':>8}"
    return (f"epoch {epoch:4d}/{epochs} | loss {record['train_loss']:7.4f} | "
            f"train {record['train_acc']:6.2f}% | test {record['test_acc']:6.2f}% "
            f"(running {record['test_acc_running']:6.2f}%) | lr {sci(record['lr'])} | "
            f"eta* {sci(record['olr_eta'])} | kappa {sci(record['kappa'])} | "
            f"nog skips {record['nog_skips']:d} | {record['time']:7.1f} s "
            f"({1000 * record['time_per_step']:6.1f} ms/step)")


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build or resume the run, and train; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args)

    # Reject a new run over an existing folder before any download or training.
    if not args.dry_run and not args.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists and is not empty; pass --resume "
                        f"to continue that run, or choose another --run_dir")
    seed_everything(args.seed)
    device = select_device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader, stats_loader, test_loader = make_loaders(args, generator,
                                                           device.type == 'cuda')
    model = cifar_resnet(args.arch, NUM_CLASSES[args.dataset], norm=args.norm, ow=args.ow,
                         groups=args.groups, eps=args.eps,
                         svd_backend=args.svd_backend).to(device)
    optimizer, scheduler = build_optimizer(model, args)

    steps_per_epoch = len(train_loader) if args.max_batches == 0 else min(
        len(train_loader), args.max_batches)
    recompute = args.recompute_stats == 'on' or (
        args.recompute_stats == 'auto' and args.epochs * steps_per_epoch <= RECOMPUTE_MAX_STEPS)
    if args.dry_run:
        updater = build_orthogonal_update(model, optimizer, args)
        return dry_run(model, optimizer, updater, train_loader, stats_loader, test_loader,
                       device, args, recompute)

    start_epoch, global_step, best_acc = 0, 0, 0.0
    updater_state = None
    if args.resume:
        state = load_resume_checkpoint(run_dir / 'last.pt', args)
        if state['epoch'] >= args.epochs:
            print(f"{run_dir} has already trained {state['epoch']} epochs; pass a larger "
                  f"--epochs to continue it")
            return 0
        restore(state, run_dir / 'last.pt', model, optimizer, scheduler, generator)
        start_epoch, global_step = state['epoch'], state['global_step']
        best_acc, updater_state = state['best_acc'], state['orthogonal_update']
        print(f"resuming {run_dir} after epoch {start_epoch} (best test accuracy "
              f"{best_acc:.2f}%)")
    updater = build_orthogonal_update(model, optimizer, args)
    if updater_state is not None:
        updater.load_state_dict(updater_state)
    resolved = argparse.Namespace(**{**vars(args), 'run_dir': str(run_dir)})
    prepare_run_dir(run_dir, args.resume, resolved, argv, family='cifar',
                    dataset=args.dataset, method=method_name(args.nog, args.olr, args.ow))

    # TensorBoard points and stats.jsonl lines after the checkpoint's step belong to an
    # interrupted epoch, so the logger drops them.
    purge_step = global_step + 1 if args.resume else None
    with RunLogger(run_dir, purge_step=purge_step, purge_key='step') as logger:
        run = TrainingRun(args, run_dir, device, model, optimizer, scheduler, updater,
                          generator, train_loader, stats_loader, test_loader, recompute,
                          steps_per_epoch, logger)
        best_acc = train(run, start_epoch, global_step, best_acc)
    print(f"done: best test accuracy {best_acc:.2f}% in {run_dir}")
    return 0


@dataclass
class TrainingRun:
    """The objects of one training run, built once by `main`."""

    args: argparse.Namespace
    run_dir: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    updater: OrthogonalUpdate
    generator: torch.Generator
    train_loader: DataLoader
    stats_loader: DataLoader
    test_loader: DataLoader
    recompute: bool
    steps_per_epoch: int
    logger: RunLogger


def train(run: TrainingRun, start_epoch: int, global_step: int, best_acc: float) -> float:
    """Train from `start_epoch` to `--epochs`, test and checkpoint after each epoch.

    Returns the best test accuracy in percent.
    """
    args, model, optimizer = run.args, run.model, run.optimizer
    for epoch in range(start_epoch + 1, args.epochs + 1):
        start = time.perf_counter()
        summary, global_step = train_one_epoch(model, run.train_loader, optimizer, run.updater,
                                               run.logger, run.device, args, epoch,
                                               global_step)
        train_time = time.perf_counter() - start
        lr = optimizer.param_groups[0]['lr']
        run.scheduler.step()

        # Test with the running averages, then (when on) with recomputed statistics, which
        # stay in the model so that the checkpoint reproduces test_acc.
        test_acc_running, test_loss = evaluate(model, run.test_loader, run.device,
                                               args.max_batches)
        test_acc = test_acc_running
        if run.recompute:
            batches = itertools.islice(run.stats_loader, run.steps_per_epoch)
            recompute_norm_statistics(model, batches, run.device)
            test_acc, test_loss = evaluate(model, run.test_loader, run.device,
                                           args.max_batches)
        elapsed = time.perf_counter() - start

        record = {'epoch': epoch, 'step': global_step, **summary, 'test_loss': test_loss,
                  'test_acc': test_acc, 'test_acc_running': test_acc_running,
                  'test_error': 100.0 - test_acc, 'recomputed': run.recompute, 'lr': lr,
                  'lr_pre_svd': optimizer.param_groups[-1]['lr'],
                  'nog_skips': run.updater.skipped,
                  'nog_rank_deficient': run.updater.rank_deficient, 'time': elapsed,
                  'time_per_step': train_time / max(summary['steps'], 1)}
        log_epoch(run.logger, record, global_step)
        print(status_line(epoch, args.epochs, record), flush=True)

        # Checkpoint: last.pt every epoch, best.pt on a new best test accuracy (or when absent).
        is_best = test_acc > best_acc or not (run.run_dir / 'best.pt').exists()
        best_acc = max(best_acc, test_acc)
        state = checkpoint_state(model, optimizer, run.scheduler, run.updater, run.generator,
                                 args, epoch, global_step, best_acc)
        save_checkpoint(run.run_dir / 'last.pt', state)
        if is_best:
            save_checkpoint(run.run_dir / 'best.pt', state)
    return best_acc


def log_epoch(logger: RunLogger, record: dict, global_step: int) -> None:
    logger.stats(record)
    logger.scalars(global_step, {
        'epoch/train_loss': record['train_loss'], 'epoch/train_acc': record['train_acc'],
        'epoch/train_error': 100.0 - record['train_acc'], 'epoch/test_acc': record['test_acc'],
        'epoch/test_acc_running': record['test_acc_running'],
        'epoch/test_error': record['test_error'], 'epoch/test_loss': record['test_loss']})


def dry_run(model, optimizer, updater, train_loader, stats_loader, test_loader, device,
            args, recompute: bool) -> int:
    """Train one batch, test one batch and print the status line, without a run folder."""
    one_batch = argparse.Namespace(**{**vars(args), 'max_batches': 1})
    logger = RunLogger('', enabled=False)
    start = time.perf_counter()
    summary, _ = train_one_epoch(model, train_loader, optimizer, updater, logger, device,
                                 one_batch, 1, 0)
    train_time = time.perf_counter() - start
    test_acc_running, _ = evaluate(model, test_loader, device, 1)
    test_acc = test_acc_running
    if recompute:
        recompute_norm_statistics(model, itertools.islice(stats_loader, 1), device)
        test_acc, _ = evaluate(model, test_loader, device, 1)
    elapsed = time.perf_counter() - start
    record = {**summary, 'test_acc': test_acc, 'test_acc_running': test_acc_running,
              'lr': optimizer.param_groups[0]['lr'], 'nog_skips': updater.skipped,
              'time': elapsed, 'time_per_step': train_time}
    print(status_line(1, 1, record))
    print("dry run: one training and one test batch; no run folder was created")
    return 0


if __name__ == '__main__':
    run_main(main)
