"""Tests of models/preemption.py: signal handling around a training loop, resumable data order."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from models.distributed import DistContext
from models.gan import infinite_loader
from models.preemption import PreemptionHandler, ResumableSampler, resume_position

REPO_ROOT = Path(__file__).resolve().parents[1]

LOOP_SCRIPT = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from models.preemption import PreemptionHandler

    out = Path(sys.argv[2])
    started = finished = 0
    with PreemptionHandler() as preemption:
        (out / 'ready').write_text('')
        while True:
            started += 1
            time.sleep(0.2)              # one training step, interrupted by the signal
            finished += 1
            if preemption.stop_requested():
                (out / 'checkpoint.txt').write_text(f'{started} {finished}')
                sys.exit(0)
    """)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"loop did not start (rc {process.returncode}): {stderr[-2000:]}")
        time.sleep(0.05)


def test_sigterm_finishes_step_and_exits_zero(tmp_path):
    signum = signal.SIGTERM
    script = tmp_path / 'loop.py'
    script.write_text(LOOP_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(REPO_ROOT), str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / 'ready', process, timeout=60)
    time.sleep(0.1)
    sent = time.monotonic()
    process.send_signal(signum)
    try:
        stdout, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"loop still running 10 s after {signum.name}")
    elapsed = time.monotonic() - sent

    assert process.returncode == 0, f"rc {process.returncode}: {stderr[-2000:]}"
    assert elapsed < 5, f"exit took {elapsed:.1f} s after {signum.name}"
    started, finished = map(int, (tmp_path / 'checkpoint.txt').read_text().split())
    assert started == finished >= 1, f"started {started} steps, finished {finished}"
    assert f"received {signum.name}" in stderr, stderr
    assert stderr.count('received') == 1, stderr


def test_handler_restores_previous_handlers():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionHandler() as preemption:
        assert signal.getsignal(signal.SIGTERM) == preemption._handle
        signal.raise_signal(signal.SIGTERM)
        assert preemption.requested
        assert preemption.signal_name == 'SIGTERM'
    after = {signum: signal.getsignal(signum) for signum in before}
    assert after == before


def test_second_sigint_raises_keyboard_interrupt():
    with PreemptionHandler() as preemption:
        signal.raise_signal(signal.SIGINT)
        assert preemption.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_stop_requested_alone_reads_flag():
    preemption = PreemptionHandler()
    assert preemption.stop_requested(DistContext()) is False
    preemption.requested = True
    assert preemption.stop_requested(DistContext()) is True


@pytest.mark.parametrize('world, drop_last', [(1, False), (2, False), (3, True), (3, False)])
def test_sampler_matches_distributed_sampler(world, drop_last):
    data = range(20)
    for rank in range(world):
        for epoch in (0, 5):
            ours = ResumableSampler(data, world, rank, seed=3, drop_last=drop_last)
            theirs = DistributedSampler(data, world, rank, seed=3, drop_last=drop_last)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs), (rank, epoch)


@pytest.mark.parametrize('world', [1, 2])
@pytest.mark.parametrize('start', [0, 3, 7, 10])
def test_sampler_resumes_with_remaining_indices(world, start):
    data = range(20)
    for rank in range(world):
        full = ResumableSampler(data, world, rank, seed=1)
        full.set_epoch(4)
        order = list(full)
        resumed = ResumableSampler(data, world, rank, seed=1)
        resumed.set_epoch(4)
        resumed.set_start(start)
        assert len(resumed) == len(order) - start
        assert list(resumed) == order[start:], (rank, start)
        assert list(resumed) == order, "the start position must apply to one pass only"


def test_sampler_rejects_start_past_epoch():
    with pytest.raises(ValueError, match='outside 0..10'):
        ResumableSampler(range(20), 2, 0, start=11)


def test_loader_resumes_mid_epoch():
    data = torch.arange(23)
    batch, per_epoch = 3, 8   # ceil(23 / 3) batches in every epoch
    sampler = ResumableSampler(data, seed=2)
    loader = DataLoader(data, batch_size=batch, sampler=sampler)
    history = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        history += [b.tolist() for b in loader]

    for step in (0, 5, 8, 13, 23):
        epoch, start = resume_position(step, per_epoch, batch)
        sampler = ResumableSampler(data, seed=2)
        sampler.set_epoch(epoch)
        sampler.set_start(start)
        resumed = [b.tolist() for b in DataLoader(data, batch_size=batch, sampler=sampler)]
        expected = history[step:(epoch + 1) * per_epoch]
        assert resumed == expected, f"step {step}: epoch {epoch}, start {start}"


def test_infinite_loader_resumes_mid_epoch():
    data = torch.arange(12)
    batch = 2
    sampler = ResumableSampler(data, num_replicas=2, rank=1, seed=5, drop_last=True)
    stream = infinite_loader(DataLoader(data, batch_size=batch, sampler=sampler))
    history = [next(stream).tolist() for _ in range(9)]   # 3 batches per epoch, 3 epochs

    epoch, start = resume_position(4, batches_per_epoch=3, batch_size=batch)
    sampler = ResumableSampler(data, num_replicas=2, rank=1, seed=5, drop_last=True,
                               start=start)
    stream = infinite_loader(DataLoader(data, batch_size=batch, sampler=sampler),
                             start_epoch=epoch)
    resumed = [next(stream).tolist() for _ in range(5)]
    assert resumed == history[4:], resumed
