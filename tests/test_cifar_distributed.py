"""The CIFAR trainer under torchrun, mixed precision and preemption, on the CPU.

The two-process runs fork 2 workers that call ``main_cifar100.main`` with torchrun's
variables and gloo on 127.0.0.1. The preemption test sends SIGTERM to a training subprocess
and resumes the run in this process.
"""
import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import main_cifar100
from cifar_folders import write_cifar100_folder
from models import cifar_training
from models.runs import UserError, load_checkpoint
from tests.state_checks import assert_states_equal
from tests.stop_signals import start_trainer, stop_once_written
from tests.two_ranks import TORCHRUN_VARIABLES, WORLD_SIZE, run_two_ranks

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
# 2 processes against 1 on the same global batches. In float32 the weights differed by up to
# 1.4e-4 after one step (measured with this model and data), because the sums over the ranks
# add in another order. So the comparison runs in float64, where the largest difference
# measured after 3 steps with NOG and OLR was below 1e-12.
SPLIT_ATOL = 1e-9


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory):
    """A CIFAR-100 pickle folder with 32 training and 8 test images, as the archive has it."""
    return write_cifar100_folder(tmp_path_factory.mktemp('data'), 32, 8)


def tiny_args(cifar_root, run_dir, *extra):
    """ResNet-18 with the meta-layer, NOG and OLR, 4 images a step, on the CPU."""
    return ['--dataset', 'cifar100', '--data_root', str(cifar_root), '--no_download',
            '--arch', 'resnet18', '--norm', 'zcanormbatch', '--nog', '--olr', '--lr', '0.02',
            '--batch_size', '4', '--workers', '0', '--no_progress', '--log_interval', '1',
            '--device', 'cpu', '--run_dir', str(run_dir), *extra]


# ---------------------------------------------------------------------------------------------
# Two processes with gloo
# ---------------------------------------------------------------------------------------------

def _rank_worker(rank: int, argv: list[str], out_dir: str, stop_at: int = 0) -> None:
    """Run ``main_cifar100.main(argv)`` as one rank and save its model to out_dir.

    With ``stop_at`` > 0, rank 1 sends itself SIGTERM during its ``stop_at``-th step, as a
    scheduler would.
    """
    warnings.simplefilter('ignore')
    train = cifar_training.train
    step = cifar_training.step_with_orthogonal_update
    steps_done = 0

    def step_and_signal(*args):
        nonlocal steps_done
        result = step(*args)
        steps_done += 1
        if rank == 1 and steps_done == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def recording_train(run, *args):
        result = train(run, *args)
        torch.save(run.model.state_dict(), f'{out_dir}/rank{rank}.pt')
        return result

    cifar_training.step_with_orthogonal_update = step_and_signal
    main_cifar100.train = recording_train
    assert main_cifar100.main(argv) == 0


def _run_two_ranks(argv: list[str], out_dir: Path, stop_at: int = 0) -> list[dict]:
    """Run ``main_cifar100.main(argv)`` in 2 gloo processes; return each rank's model."""
    exit_codes = run_two_ranks(_rank_worker, argv, str(out_dir), stop_at)
    assert exit_codes == [0] * WORLD_SIZE, f"exit codes {exit_codes}"
    return [torch.load(out_dir / f'rank{r}.pt', weights_only=True) for r in range(WORLD_SIZE)]


SPLIT = ['--sync_cov', '--no_augment', '--epochs', '1', '--max_batches', '2',
         '--recompute_stats', 'on']


@pytest.fixture(scope='module')
def two_ranks(cifar_root, tmp_path_factory):
    """Train 2 steps with --sync_cov in 2 processes and in 1; return the folders and models.

    Both run in float64: the images (torchvision's ToTensor) and the model take the default
    dtype, which the forked workers inherit.
    """
    logs = tmp_path_factory.mktemp('runs')
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ranks = _run_two_ranks(tiny_args(cifar_root, logs / 'two', *SPLIT),
                               tmp_path_factory.mktemp('ranks'))
        torch.set_num_threads(1)
        assert main_cifar100.main(tiny_args(cifar_root, logs / 'one', *SPLIT)) == 0
    finally:
        torch.set_default_dtype(dtype)
    return logs, ranks


def test_ranks_end_with_identical_models(two_ranks):
    # Parameters and, with --sync_cov, the running whitening and batch norm statistics.
    _, (rank0, rank1) = two_ranks
    assert any('running_whitening' in name for name in rank0), sorted(rank0)
    assert_states_equal(rank0, rank1, 'model')


def test_two_ranks_match_one_process(two_ranks):
    logs, (rank0, _) = two_ranks
    one = load_checkpoint(logs / 'one' / 'last.pt')
    two = load_checkpoint(logs / 'two' / 'last.pt')
    assert one['global_step'] == two['global_step'] == 2
    for name, tensor in one['model'].items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, two['model'][name]), name
            continue
        difference = (tensor - two['model'][name]).abs().max().item()
        assert difference <= SPLIT_ATOL, f"{name}: max difference {difference:.2e}"
    assert_states_equal(two['model'], rank0, 'rank 0 model against its checkpoint')
    record_one, = [json.loads(line) for line in (logs / 'one' / 'stats.jsonl').read_text().splitlines()]
    record_two, = [json.loads(line) for line in (logs / 'two' / 'stats.jsonl').read_text().splitlines()]
    assert record_two['train_loss'] == pytest.approx(record_one['train_loss'], abs=1e-9)
    assert record_two['train_acc'] == record_one['train_acc']


def test_rank0_writes_one_run_folder(two_ranks):
    logs, _ = two_ranks
    run_dir = logs / 'two'
    assert sorted(p.name for p in run_dir.iterdir()) == [
        'best.pt', 'config.json', 'last.pt', 'stats.jsonl', 'tb']
    assert len(list((run_dir / 'tb').iterdir())) == 1, 'more than one TensorBoard file'
    state = load_checkpoint(run_dir / 'last.pt')
    assert state['world_size'] == WORLD_SIZE, state['world_size']
    assert len(state['rank_states']) == WORLD_SIZE
    # Ranks draw different augmentations: their random states differ.
    rng0, rng1 = (s['rng']['torch'] for s in state['rank_states'])
    assert not torch.equal(rng0, rng1), 'ranks share one random state'


@pytest.fixture
def fake_torchrun(monkeypatch):
    """torchrun's variables for rank 0 of 2; no process group is started by these tests."""
    values = dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', LOCAL_WORLD_SIZE='2',
                  MASTER_ADDR='127.0.0.1', MASTER_PORT='1')
    for name in TORCHRUN_VARIABLES:
        monkeypatch.setenv(name, values[name])


def test_batch_not_divisible_by_ranks(fake_torchrun, cifar_root, tmp_path):
    argv = tiny_args(cifar_root, tmp_path / 'run', '--batch_size', '3')
    with pytest.raises(UserError, match='--batch_size 3 .* multiple of the number of processes'):
        main_cifar100.main(argv)
    assert not dist.is_initialized()
    assert not (tmp_path / 'run').exists(), 'a run folder was created for a bad --batch_size'


def test_torchrun_rejects_device_index(fake_torchrun, cifar_root, tmp_path):
    argv = tiny_args(cifar_root, tmp_path / 'run', '--device', 'cuda:1')
    with pytest.raises(UserError, match='--device cuda:1 conflicts with torchrun'):
        main_cifar100.main(argv)
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------

# GradScaler skips the first fp16 steps while it lowers its initial scale of 2**16, so the
# scheduler steps before any optimizer step and torch warns about it.
@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler.step')
@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_autocast_trains_with_finite_losses(cifar_root, tmp_path, amp):
    run_dir = tmp_path / amp
    argv = tiny_args(cifar_root, run_dir, '--amp', amp, '--channels_last', '--epochs', '1',
                     '--max_batches', '1', '--recompute_stats', 'off')
    assert main_cifar100.main(argv) == 0
    record, = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    for key in ('train_loss', 'test_loss', 'kappa'):
        assert np.isfinite(record[key]), f"{key} {record[key]}"
    state = load_checkpoint(run_dir / 'last.pt')
    weights = torch.cat([v.flatten().float() for v in state['model'].values()])
    assert torch.isfinite(weights).all(), 'non-finite weights'
    # Only fp16 uses a loss scale, and its state is saved for the resume.
    assert bool(state['scaler']) == (amp == 'fp16'), state['scaler']


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------

# 32 images at 4 a step: 8 steps per epoch. The run stops inside epoch 2 and the learning rate
# decays after every epoch, so a resume that stepped the scheduler at the wrong time would end
# with other weights.
SIGTERM_RUN = ['--epochs', '2', '--lr_step', '1', '--lr_gamma', '0.5', '--recompute_stats',
               'off']


# NOTE: this test failed twice in about 15 runs, both while a long torch.compile job loaded
# the machine: the resumed weights differed from the uninterrupted ones. The cause is not
# known. Stops raised in-process at each of steps 3 and 9 to 16 resumed bit for bit, and 8
# later runs beside two busy-loop processes (load about 4 on 2 cores) all passed.
def test_sigterm_mid_epoch_and_resume_is_exact(cifar_root, tmp_path):
    # Wait for the record of epoch 1, then stop the run inside epoch 2.
    stopped = tmp_path / 'stopped'
    process = start_trainer(['main_cifar100.py', *tiny_args(cifar_root, stopped, *SIGTERM_RUN)],
                            REPO)
    result = stop_once_written(process, stopped / 'stats.jsonl')
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert result.seconds < 10, f"exit took {result.seconds:.1f} s after SIGTERM"
    assert 'received SIGTERM' in result.stderr, result.stderr[-2000:]
    state = load_checkpoint(stopped / 'last.pt')
    assert state['epoch'] == 1, f"checkpoint after epoch {state['epoch']}"
    steps = state['epoch_sums']['steps']
    assert 1 <= steps < 8, f"stopped after {steps} steps of epoch 2"
    assert state['global_step'] == 8 + steps, state['global_step']
    assert f"stopped by SIGTERM after step {state['global_step']}" in result.stdout, result.stdout

    # Resume to the end, and compare with an uninterrupted run.
    assert main_cifar100.main(tiny_args(cifar_root, stopped, *SIGTERM_RUN, '--resume')) == 0
    straight = tmp_path / 'straight'
    assert main_cifar100.main(tiny_args(cifar_root, straight, *SIGTERM_RUN)) == 0
    one, two = load_checkpoint(straight / 'last.pt'), load_checkpoint(stopped / 'last.pt')
    assert one['global_step'] == two['global_step'] == 16
    for key in ('model', 'optimizer', 'scheduler', 'orthogonal_update', 'rng',
                'loader_generator', 'best_acc'):
        assert_states_equal(one[key], two[key], f"{key} (stopped after step {8 + steps})")
    records = [json.loads(line) for line in (stopped / 'stats.jsonl').read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / 'stats.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2]
    for got, want in zip(records, expected):
        for key in ('step', 'train_loss', 'train_acc', 'test_acc', 'lr', 'olr_eta'):
            assert got[key] == want[key], f"epoch {got['epoch']} {key}: {got[key]} != {want[key]}"


def test_sigterm_to_process_group_with_workers(cifar_root, tmp_path):
    # Schedulers and Ctrl-C signal the whole process group, loader workers included. The
    # workers must ignore the signal so that the trainer can finish its step and save.
    run_dir = tmp_path / 'group'
    argv = tiny_args(cifar_root, run_dir, *SIGTERM_RUN)
    argv[argv.index('--workers') + 1] = '1'
    process = start_trainer(['main_cifar100.py', *argv], REPO)
    result = stop_once_written(process, run_dir / 'stats.jsonl', group=True)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert 'killed by signal' not in result.stderr, result.stderr[-2000:]
    state = load_checkpoint(run_dir / 'last.pt')
    assert state['global_step'] > 8, f"checkpoint at step {state['global_step']}"


# 2 processes, 2 steps per epoch, 2 epochs; rank 1 receives SIGTERM in step 3 (epoch 2).
TWO_RANK_STOP = ['--sync_cov', '--epochs', '2', '--max_batches', '2', '--lr_step', '1',
                 '--lr_gamma', '0.5', '--recompute_stats', 'off']
TWO_RANK_STOP_AT = 3


@pytest.fixture(scope='module')
def stopped_two_ranks(cifar_root, tmp_path_factory):
    """An uninterrupted 2-process run, and one that rank 1's SIGTERM stops, then resumed."""
    logs = tmp_path_factory.mktemp('stop_runs')
    _run_two_ranks(tiny_args(cifar_root, logs / 'whole', *TWO_RANK_STOP),
                   tmp_path_factory.mktemp('whole'))
    stopped = _run_two_ranks(tiny_args(cifar_root, logs / 'split', *TWO_RANK_STOP),
                             tmp_path_factory.mktemp('stopped'), stop_at=TWO_RANK_STOP_AT)
    stopped_state = load_checkpoint(logs / 'split' / 'last.pt')
    _run_two_ranks(tiny_args(cifar_root, logs / 'split', *TWO_RANK_STOP, '--resume'),
                   tmp_path_factory.mktemp('resumed'))
    return logs, stopped, stopped_state


def test_sigterm_to_one_rank_stops_both(stopped_two_ranks):
    # Both ranks exited 0 (checked when they ran) after the same step, and rank 0 saved
    # the position: epoch 1 done, 1 step of epoch 2.
    _, (rank0, rank1), state = stopped_two_ranks
    assert_states_equal(rank0, rank1, 'model after the stop')
    assert_states_equal(state['model'], rank0, 'checkpoint against rank 0')
    assert state['global_step'] == TWO_RANK_STOP_AT, state['global_step']
    assert state['epoch'] == 1, state['epoch']
    assert state['epoch_sums']['steps'] == 1, state['epoch_sums']
    assert len(state['rank_states']) == WORLD_SIZE


def test_two_rank_resume_matches_uninterrupted(stopped_two_ranks):
    logs, _, _ = stopped_two_ranks
    whole, split = load_checkpoint(logs / 'whole' / 'last.pt'), load_checkpoint(
        logs / 'split' / 'last.pt')
    assert whole['global_step'] == split['global_step'] == 4
    for key in ('model', 'optimizer', 'scheduler', 'orthogonal_update', 'rank_states',
                'best_acc'):
        assert_states_equal(whole[key], split[key], key)
    records = [json.loads(line) for line in (logs / 'split' / 'stats.jsonl').read_text().splitlines()]
    expected = [json.loads(line) for line in (logs / 'whole' / 'stats.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2]
    for got, want in zip(records, expected):
        for key in ('step', 'train_loss', 'train_acc', 'test_acc', 'lr', 'olr_eta'):
            assert got[key] == want[key], f"epoch {got['epoch']} {key}: {got[key]} != {want[key]}"
