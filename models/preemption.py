"""Surviving preemption: finish the step, save a checkpoint, exit 0, and resume the data order.

Cluster schedulers stop a job with SIGTERM and, after a grace period, SIGKILL. torchrun passes
a SIGTERM on to its workers and sends SIGKILL when they are still running after
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30 by default in torch 2.14), so a checkpoint must
fit in that time. ``PreemptionHandler`` turns SIGTERM and SIGINT into a flag that the training
loop polls once per step:

    with PreemptionHandler() as preemption:
        for step in range(start_step, total_steps):
            train_step(...)
            if preemption.stop_requested(ctx):
                save_checkpoint(...)        # records (epoch, position) among the rest
                return 0

``ResumableSampler`` computes the data order of an epoch from (seed, epoch) and can start at a
position inside it. A checkpoint that stores the epoch and the number of batches done then
continues with exactly the batches that were left.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Iterator

import torch
from torch.utils.data import DistributedSampler

from models.distributed import DistContext, any_rank

log = logging.getLogger(__name__)


def ignore_stop_signals(worker_id: int) -> None:
    """Make a DataLoader worker ignore SIGTERM and SIGINT (pass as ``worker_init_fn``).

    Schedulers, ``timeout`` and Ctrl-C may signal the whole process group. A loader worker
    killed that way makes the training process raise ("DataLoader worker ... is killed by
    signal") before the step can finish and the checkpoint be written, and under torchrun
    the other ranks then wait in a collective. The workers ignore both signals and end when
    the loader shuts them down or the training process exits.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PreemptionHandler:
    """Context manager that records SIGTERM and SIGINT in ``requested`` instead of exiting.

    On the first signal it logs one line and sets ``requested`` and ``signal_name``. The loop
    then finishes its step, writes a checkpoint and exits 0. A later SIGINT (a second Ctrl-C) raises
    KeyboardInterrupt as usual, for when the user wants to stop at once. A repeated SIGTERM
    only sets the flag again. The previous handlers are restored on exit.

    Signals reach only the main thread, so outside it the handler installs nothing and
    ``requested`` stays False.

    Under torchrun (torch 2.14) each worker runs in a session of its own, so a Ctrl-C in the
    terminal reaches torchrun alone, which passes one SIGINT on: the workers save as for
    SIGTERM, and the log line leaves out the hint about a second Ctrl-C.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            # Under torchrun a second Ctrl-C reaches torchrun, not this process.
            hint = '' if 'TORCHELASTIC_RUN_ID' in os.environ else \
                ' (press Ctrl-C again to stop at once)'
            log.warning("received %s: finishing the current step, then saving a checkpoint "
                        "and exiting%s", name, hint)
        self.requested = True
        self.signal_name = self.signal_name or name

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def stop_requested(self, ctx: DistContext | None = None) -> bool:
        """Return True when this rank, or under torchrun any rank, received a signal.

        With a ``DistContext`` of a distributed run this is a collective (one small
        all-reduce), so every rank must call it at the same step. All ranks then stop at the
        same step, and none waits forever in an all-reduce that the others have left.
        """
        if ctx is None:
            return self.requested
        return any_rank(self.requested, ctx)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` order that can start a pass at a position inside the epoch.

    Epoch ``e`` uses ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``
    (padded by repeating its start to a multiple of ``num_replicas``, or cut with
    ``drop_last``), and rank ``r`` takes every ``num_replicas``-th index from ``r``, exactly
    as ``DistributedSampler`` does. ``start`` skips the first ``start`` indices of this rank's
    list in the next pass only, and ``len`` counts what that pass yields. With a DataLoader of
    per-rank batch ``B``, resume after ``k`` batches of epoch ``e`` with
    ``set_epoch(e); set_start(k * B)``.

    Without a process group pass ``num_replicas=1, rank=0`` (the defaults here, unlike
    ``DistributedSampler``, which then needs a process group).

    NOTE: this restores the order of the samples, not the random augmentation of each one;
    that depends on the random state of the DataLoader's workers.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, start: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.set_start(start)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's list in the next pass only."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start={start} is outside 0..{self.num_samples}, the number of "
                             f"samples per rank in an epoch")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def resume_position(step: int, batches_per_epoch: int, batch_size: int) -> tuple[int, int]:
    """Return (epoch, start) of global step ``step`` for a loader of ``batches_per_epoch``.

    ``start = (step mod batches_per_epoch) * batch_size`` samples of this rank, for
    ``ResumableSampler.set_start``; ``batch_size`` is the per-rank batch.
    """
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
    epoch, batch_index = divmod(step, batches_per_epoch)
    return epoch, batch_index * batch_size


def make_resumable_sampler(dataset, ctx: DistContext, seed: int, shuffle: bool = True,
                           drop_last: bool = False) -> ResumableSampler:
    """Return a ``ResumableSampler`` over ``dataset`` for the rank of ``ctx``.

    All ranks must pass the same ``seed``: the split assumes they share one permutation.
    """
    return ResumableSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                            shuffle=shuffle, seed=seed, drop_last=drop_last)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Return the order of epoch ``epoch`` for ``n`` samples, as ``ResumableSampler`` draws it."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()
