"""Training loop, evaluation and checkpoints of the CIFAR decorrelated batch norm experiments.

Song, Sebe and Wang (arXiv 2207.02119) whiten the 64 stem channels of a CIFAR ResNet with the
ZCA meta-layer and treat the stem convolution as the pre-SVD layer. `main_cifar100.py` builds
the run and this module trains it, as one process or as one process per GPU under torchrun:

- the forward runs through the DDP wrapper (`TrainingRun.forward_model`), which averages the
  gradients during backward, so NOG and OLR act on the same averaged gradient on every rank;
- testing, recomputed statistics and checkpoints use the bare model (`TrainingRun.model`),
  and rank 0 alone tests and writes files;
- a SIGTERM or SIGINT ends the current step, and the checkpoint records the epoch and the
  batches done in it, so that `--resume` continues with the very next batch.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.amp import autocast, step_with_orthogonal_update
from models.distributed import DistContext, all_reduce_mean, barrier
from models.orthogonality import OrthogonalUpdate
from models.preemption import PreemptionHandler, ResumableSampler
from models.runs import RunLogger, get_rng_state, save_checkpoint, set_rng_state
from models.zca import recompute_norm_statistics


@dataclass
class TrainingRun:
    """The objects of one training run, built once by `main_cifar100.main`.

    `model` is the bare network, `forward_model` the same network behind DDP and
    `torch.compile` where these are on. `stats_loader` is None on ranks that skip the
    recomputation of the norm statistics (see `recompute_statistics`).
    """

    args: argparse.Namespace
    ctx: DistContext
    run_dir: Path
    model: nn.Module
    forward_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    updater: OrthogonalUpdate
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    train_sampler: ResumableSampler
    train_loader: DataLoader
    stats_loader: DataLoader | None
    test_loader: DataLoader
    recompute: bool
    steps_per_epoch: int
    logger: RunLogger
    preemption: PreemptionHandler | None = None


def new_epoch_sums(device: torch.device) -> dict:
    """Running sums of one epoch: loss, correct predictions, images, steps, steps using eta*."""
    return {'loss_sum': torch.zeros((), device=device),
            'correct': torch.zeros((), dtype=torch.long, device=device),
            'seen': 0, 'steps': 0, 'eta_used_steps': 0}


def train_one_epoch(run: TrainingRun, epoch: int, global_step: int,
                    sums: dict) -> tuple[dict, int, bool]:
    """Train the rest of epoch `epoch`, adding to `sums` (which a resumed epoch brings along).

    Returns the epoch summary, the new global step and whether a signal stopped the epoch.
    The summary contains the mean training loss and the training accuracy in percent (over
    all ranks), the meta-layer statistics and eta* of the last step, and the fraction of
    steps whose eta* was below the base rate and used.
    """
    args, ctx, optimizer, updater = run.args, run.ctx, run.optimizer, run.updater
    device = ctx.device
    run.forward_model.train()
    steps = max(run.steps_per_epoch - sums['steps'], 0)
    bar = tqdm(itertools.islice(run.train_loader, steps), total=steps, leave=False,
               desc=f'epoch {epoch}', disable=True if args.no_progress or not ctx.is_main
               else None)
    stopped = False
    for images, labels in bar:
        # Fetch batch.
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        # Forward under autocast. The loss is taken in float32 (or wider) whatever the
        # autocast dtype.
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.amp):
            logits = run.forward_model(images)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits, labels)

        # Backward (DDP averages the gradients over the ranks), unscale under fp16, then the
        # nearest-orthogonal gradient (--nog) and eta* (--olr) for the stem group, against the
        # scheduled rate of the other parameters. The step is skipped when NOG finds a
        # gradient without a usable polar factor (NaN, Inf or zero) or fp16 overflowed.
        base_lr = optimizer.param_groups[0]['lr']
        step_with_orthogonal_update(loss, optimizer, run.scaler, updater, base_lr)
        if updater.last['eta_used'] and all(updater.last['eta_used']):
            sums['eta_used_steps'] += 1
        global_step += 1
        sums['steps'] += 1

        # Log: running sums on the device, so there is no host sync except at log points.
        sums['loss_sum'] += loss.detach() * labels.shape[0]
        sums['correct'] += (logits.argmax(1) == labels).sum()
        sums['seen'] += labels.shape[0]
        if global_step % args.log_interval == 0 and ctx.is_main:
            scalars = step_scalars(run.model, optimizer, updater, loss.item())
            run.logger.scalars(global_step, scalars)
            bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                            acc=f"{100.0 * sums['correct'].item() / sums['seen']:.1f}%")

        # Preemption: every rank polls the flag (a collective under torchrun), so all ranks
        # stop at the same step.
        if run.preemption is not None and run.preemption.stop_requested(ctx):
            stopped = True
            break
    bar.close()
    return epoch_summary(run, sums), global_step, stopped


def reduce_epoch_sums(sums: dict, ctx: DistContext) -> dict:
    """Return `sums` averaged over the ranks (unchanged in a single process).

    The mean over ranks keeps the ratios (loss per image, accuracy) of the global sums.
    """
    if not ctx.is_distributed:
        return sums
    keys = ('loss_sum', 'correct', 'seen')
    mean = all_reduce_mean({key: sums[key] for key in keys}, ctx)
    return {**sums, 'loss_sum': torch.tensor(mean['loss_sum'], device=ctx.device),
            'correct': torch.tensor(mean['correct'], device=ctx.device), 'seen': mean['seen']}


def epoch_summary(run: TrainingRun, sums: dict) -> dict:
    """Return the epoch record's training fields, from sums averaged over the ranks."""
    total = reduce_epoch_sums(sums, run.ctx)
    seen = max(total['seen'], 1)
    steps = max(sums['steps'], 1)
    return {'train_loss': total['loss_sum'].item() / seen,
            'train_acc': 100.0 * total['correct'].item() / seen, 'steps': sums['steps'],
            **meta_stats(run.model), 'olr_eta': last_eta(run.updater),
            'olr_eta_used': sums['eta_used_steps'] / steps if run.updater.olr else None}


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
    """Return the test accuracy in percent and the mean test loss, in evaluation mode.

    Pass the bare model: in evaluation mode it runs no collective, so rank 0 can test alone.
    Testing runs in float32 whatever --amp sets.
    """
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


def recompute_statistics(run: TrainingRun, batches: int) -> None:
    """Recompute the norm statistics over `batches` batches of `run.stats_loader`.

    With --sync_cov (or alone) every rank passes its share of the training images and the
    synchronised layers sum the moments, so every rank ends with the full-data statistics.
    Without it only rank 0 recomputes, over global batches, and DDP copies rank 0's buffers
    to the other ranks at the next training forward.
    """
    if run.stats_loader is not None:
        recompute_norm_statistics(run.model, itertools.islice(run.stats_loader, batches),
                                  run.ctx.device)


def gather_rank_states(ctx: DistContext, generator_state: torch.Tensor) -> list[dict]:
    """Return every rank's global random state and loader generator state, in rank order.

    A collective under torchrun: every rank must call it at the same step.
    """
    state = {'rng': get_rng_state(), 'loader_generator': generator_state}
    if not ctx.is_distributed:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def checkpoint_state(run: TrainingRun, epoch: int, global_step: int, best_acc: float,
                     rank_states: list[dict], epoch_sums: dict | None = None) -> dict:
    """Return everything a resume needs, as tensors and plain Python values.

    `epoch` counts the completed epochs. A checkpoint written inside an epoch also contains
    `epoch_sums`, the steps done in the next epoch and their running sums. Its loader
    generator state is the one from the start of that epoch, so the resumed loader draws
    the same worker seed.
    """
    state = {'epoch': epoch, 'global_step': global_step, 'best_acc': best_acc,
             'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
             'scheduler': run.scheduler.state_dict(),
             'orthogonal_update': run.updater.state_dict(), 'scaler': run.scaler.state_dict(),
             'rng': rank_states[0]['rng'], 'loader_generator': rank_states[0]['loader_generator'],
             'rank_states': rank_states, 'world_size': run.ctx.world_size,
             'epoch_sums': epoch_sums, 'options': dict(vars(run.args))}
    return state


def restore_rank_state(state: dict, ctx: DistContext, generator: torch.Generator) -> bool:
    """Restore this rank's random state and loader generator; return False when unavailable.

    A checkpoint written by another number of processes has no state for ranks above 0.
    """
    per_rank = state.get('rank_states') or [{'rng': state['rng'],
                                             'loader_generator': state['loader_generator']}]
    if len(per_rank) == ctx.world_size:
        own = per_rank[ctx.rank]
    elif ctx.rank == 0:
        own = per_rank[0]
    else:
        return False
    set_rng_state(own['rng'])
    generator.set_state(own['loader_generator'])
    return True


def train(run: TrainingRun, start_epoch: int, global_step: int, best_acc: float,
          epoch_sums: dict | None = None) -> tuple[float, int | None]:
    """Train from `start_epoch` (completed epochs) to --epochs, test and checkpoint each epoch.

    `epoch_sums` continues an epoch that a signal interrupted. Returns the best test accuracy
    in percent and, when a signal stopped the run, the global step of its checkpoint.
    """
    args, ctx, optimizer = run.args, run.ctx, run.optimizer
    per_batch = run.train_loader.batch_size
    for epoch in range(start_epoch + 1, args.epochs + 1):
        # Data order of this epoch from (seed, epoch), starting after the batches done.
        sums = epoch_sums or new_epoch_sums(ctx.device)
        epoch_sums = None
        run.train_sampler.set_epoch(epoch)
        run.train_sampler.set_start(min(sums['steps'] * per_batch,
                                        run.train_sampler.num_samples))
        generator_state = run.generator.get_state()
        steps_before = sums['steps']  # done before a resume, in another process
        start = time.perf_counter()
        summary, global_step, stopped = train_one_epoch(run, epoch, global_step, sums)
        train_time = time.perf_counter() - start

        # Stopped by a signal: save the position inside the epoch and leave.
        # Every rank joins the two collectives, and only rank 0 writes.
        if stopped:
            rank_states = gather_rank_states(ctx, generator_state)
            mean_sums = reduce_epoch_sums(sums, ctx)
            if ctx.is_main:
                state = checkpoint_state(run, epoch - 1, global_step, best_acc, rank_states,
                                         mean_sums)
                save_checkpoint(run.run_dir / 'last.pt', state)
            barrier(ctx)
            return best_acc, global_step
        lr = optimizer.param_groups[0]['lr']
        run.scheduler.step()

        # Test with the running averages, then (when on) with recomputed statistics, which
        # stay in the model so that the checkpoint reproduces test_acc. Rank 0 tests alone.
        test_acc_running, test_loss = evaluate_on_main(run)
        test_acc = test_acc_running
        if run.recompute:
            recompute_statistics(run, run.steps_per_epoch)
            test_acc, test_loss = evaluate_on_main(run)
        elapsed = time.perf_counter() - start

        # Log and checkpoint on rank 0: last.pt every epoch, best.pt on a new best test
        # accuracy (or when absent).
        rank_states = gather_rank_states(ctx, run.generator.get_state())
        if ctx.is_main:
            record = {'epoch': epoch, 'step': global_step, **summary, 'test_loss': test_loss,
                      'test_acc': test_acc, 'test_acc_running': test_acc_running,
                      'test_error': 100.0 - test_acc, 'recomputed': run.recompute, 'lr': lr,
                      'lr_pre_svd': optimizer.param_groups[-1]['lr'],
                      'nog_skips': run.updater.skipped,
                      'nog_rank_deficient': run.updater.rank_deficient, 'time': elapsed,
                      'time_per_step': train_time / max(summary['steps'] - steps_before, 1)}
            log_epoch(run.logger, record, global_step)
            print(status_line(epoch, args.epochs, record), flush=True)
            is_best = test_acc > best_acc or not (run.run_dir / 'best.pt').exists()
            best_acc = max(best_acc, test_acc)
            state = checkpoint_state(run, epoch, global_step, best_acc, rank_states)
            save_checkpoint(run.run_dir / 'last.pt', state)
            if is_best:
                save_checkpoint(run.run_dir / 'best.pt', state)
        barrier(ctx)
    return best_acc, None


def evaluate_on_main(run: TrainingRun) -> tuple[float | None, float | None]:
    """Test on rank 0 (None elsewhere) with the bare model, which runs no collective."""
    if not run.ctx.is_main:
        return None, None
    return evaluate(run.model, run.test_loader, run.ctx.device, run.args.max_batches)


def log_epoch(logger: RunLogger, record: dict, global_step: int) -> None:
    """Append the epoch record to stats.jsonl and its main fields to TensorBoard."""
    logger.stats(record)
    logger.scalars(global_step, {
        'epoch/train_loss': record['train_loss'], 'epoch/train_acc': record['train_acc'],
        'epoch/train_error': 100.0 - record['train_acc'], 'epoch/test_acc': record['test_acc'],
        'epoch/test_acc_running': record['test_acc_running'],
        'epoch/test_error': record['test_error'], 'epoch/test_loss': record['test_loss']})


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


def dry_run(run: TrainingRun) -> int:
    """Train one batch, test one batch and print the status line, without a run folder."""
    run.args = argparse.Namespace(**{**vars(run.args), 'max_batches': 1})
    run.steps_per_epoch = 1
    run.train_sampler.set_epoch(1)
    start = time.perf_counter()
    summary, _, _ = train_one_epoch(run, 1, 0, new_epoch_sums(run.ctx.device))
    train_time = time.perf_counter() - start
    test_acc_running, _ = evaluate_on_main(run)
    test_acc = test_acc_running
    if run.recompute:
        recompute_statistics(run, 1)
        test_acc, _ = evaluate_on_main(run)
    elapsed = time.perf_counter() - start
    if run.ctx.is_main:
        record = {**summary, 'test_acc': test_acc, 'test_acc_running': test_acc_running,
                  'lr': run.optimizer.param_groups[0]['lr'], 'nog_skips': run.updater.skipped,
                  'time': elapsed, 'time_per_step': train_time}
        print(status_line(1, 1, record))
        print("dry run: one training and one test batch; no run folder was created")
    return 0
