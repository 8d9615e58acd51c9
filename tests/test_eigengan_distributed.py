"""Tests of the EigenGAN trainer under torchrun, mixed precision and preemption (CPU only).

The two-process run forks 2 workers that call ``trainer.main`` with torchrun's variables and
gloo on 127.0.0.1. The preemption test sends SIGTERM to a training subprocess and resumes it.
"""
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from eigengan import trainer
from eigengan.state import build_models, build_state
from models.distributed import DistContext
from models.runs import UserError, load_checkpoint
from test_images import make_image_folder
from tests.state_checks import assert_states_equal
from tests.stop_signals import start_trainer, stop_once_written
from tests.two_ranks import TORCHRUN_VARIABLES, WORLD_SIZE, run_two_ranks

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
# Tiny networks on 32-pixel images; --batch 4 is 2 images per rank. The 10 readable images
# give 2 steps per epoch, so 3 steps cross an epoch boundary. R1 runs at steps 0 and 2.
TINY = ['--size', '32', '--batch', '4', '--n_basis', '3', '--noise_dim', '8',
        '--base_channels', '4', '--max_channels', '8', '--n_workers', '0', '--n_sample', '4',
        '--d_reg_every', '2', '--device', 'cpu', '--reg_type', 'nog_olr']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    make_image_folder(root)
    return root


def run_argv(data_dir, logdir, name, *extra):
    return [str(data_dir), *TINY, '--logdir', str(logdir), '--name', name, *extra]


def train(data_dir, logdir, name, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the skipped broken files
        assert trainer.main(run_argv(data_dir, logdir, name, *extra), size=256) == 0
    return logdir / name


def read_stats(run_dir):
    return [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Two processes with gloo
# ---------------------------------------------------------------------------------------------

def _rank_worker(rank: int, argv: list[str], out_dir: str, stop_at: int = 0) -> None:
    """Run ``trainer.main(argv)`` as one rank and save its training state to out_dir.

    With ``stop_at`` > 0, rank 1 sends itself SIGTERM during its ``stop_at``-th
    discriminator step, as a scheduler would.
    """
    warnings.simplefilter('ignore')
    # Keep this rank's training state, to compare the ranks after training.
    built = []
    d_step = trainer.d_step
    d_steps = 0

    def recording_build_state(*args):
        built.append(build_state(*args))
        return built[-1]

    def d_step_and_signal(*args):
        nonlocal d_steps
        d_steps += 1
        if rank == 1 and d_steps == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return d_step(*args)

    trainer.build_state = recording_build_state
    trainer.d_step = d_step_and_signal
    trainer.main(argv, size=256)
    s = built[0]
    torch.save({'G': s.G.state_dict(), 'D': s.D.state_dict(), 'G_ema': s.G_ema.state_dict(),
                'g_optim': s.g_optim.state_dict(), 'd_optim': s.d_optim.state_dict(),
                'torch_rng': torch.get_rng_state()}, f'{out_dir}/rank{rank}.pt')


def _run_two_ranks(argv: list[str], out_dir: Path, stop_at: int = 0) -> list[dict]:
    """Run ``trainer.main(argv)`` in 2 gloo processes; return each rank's final state."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exit_codes = run_two_ranks(_rank_worker, argv, str(out_dir), stop_at)
    assert exit_codes == [0] * WORLD_SIZE, f"exit codes {exit_codes}"
    return [torch.load(out_dir / f'rank{r}.pt', weights_only=True) for r in range(WORLD_SIZE)]


@pytest.fixture(scope='module')
def two_ranks(data_dir, tmp_path_factory):
    """Train 3 steps in 2 processes; return the run folder and each rank's final state.

    A copy of the run folder is then resumed from its step-2 checkpoint to step 3, also with
    2 processes, into ``two_resumed``.
    """
    logdir = tmp_path_factory.mktemp('logs')
    run_dir = logdir / 'two'
    argv = run_argv(data_dir, logdir, 'two', '--steps', '3', '--ckpt_every', '2')
    ranks = _run_two_ranks(argv, tmp_path_factory.mktemp('ranks'))

    shutil.copytree(run_dir, logdir / 'two_resumed')
    checkpoint = logdir / 'two_resumed' / 'checkpoints' / '0000002.pt'
    argv = run_argv(data_dir, logdir, 'two_resumed', '--steps', '3', '--ckpt_every', '2',
                    '--ckpt', str(checkpoint))
    _run_two_ranks(argv, tmp_path_factory.mktemp('resumed_ranks'))
    return run_dir, ranks


def test_ranks_end_with_identical_models(two_ranks):
    _, (rank0, rank1) = two_ranks
    for key in ('G', 'D', 'G_ema', 'g_optim', 'd_optim'):
        assert_states_equal(rank0[key], rank1[key], key)


def test_ranks_draw_different_noise(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert not torch.equal(rank0['torch_rng'], rank1['torch_rng']), 'ranks share one RNG state'


def test_rank0_writes_one_run_folder(two_ranks):
    run_dir, (rank0, _) = two_ranks
    assert sorted(p.name for p in run_dir.iterdir()) == [
        'checkpoints', 'config.json', 'samples', 'stats.jsonl', 'tb']
    names = sorted(p.name for p in (run_dir / 'checkpoints').iterdir())
    assert names == ['0000002.pt', '0000003.pt', 'last.pt'], names
    assert len(list((run_dir / 'tb').iterdir())) == 1, 'more than one TensorBoard file'
    assert [r['step'] for r in read_stats(run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / 'samples').iterdir()) == ['0000003.png']
    state = load_checkpoint(run_dir / 'checkpoints' / 'last.pt')
    assert state['world_size'] == WORLD_SIZE, state['world_size']
    assert len(state['rng_per_rank']) == WORLD_SIZE
    assert state['data_position'] == {'epoch': 1, 'batches_done_in_epoch': 1}
    assert state['finished'] is True
    assert_states_equal(state['G'], rank0['G'], 'G')
    assert_states_equal(state['G_ema'], rank0['G_ema'], 'G_ema')


def test_two_rank_resume_is_exact(two_ranks):
    run_dir, _ = two_ranks
    a = load_checkpoint(run_dir / 'checkpoints' / 'last.pt')
    b = load_checkpoint(run_dir.with_name('two_resumed') / 'checkpoints' / 'last.pt')
    assert a['step'] == b['step'] == 3
    for key in ('G', 'D', 'G_ema', 'g_optim', 'd_optim', 'orth_update', 'rng_per_rank'):
        assert_states_equal(a[key], b[key], key)


def test_one_rank_sigterm_resumes_exactly(two_ranks, data_dir, tmp_path):
    # Rank 1 receives SIGTERM in step 1 of 3: both ranks stop after it and exit 0 (checked
    # when they ran), rank 0 writes last.pt only, and the resumed run ends as the
    # uninterrupted one.
    run_dir, _ = two_ranks
    argv = run_argv(data_dir, tmp_path, 'stopped', '--steps', '3', '--ckpt_every', '2')
    rank0, rank1 = _run_two_ranks(argv, tmp_path / 'stopped_ranks', stop_at=1)
    for key in ('G', 'D', 'G_ema', 'g_optim', 'd_optim'):
        assert_states_equal(rank0[key], rank1[key], key)
    stopped = tmp_path / 'stopped' / 'checkpoints'
    assert sorted(p.name for p in stopped.iterdir()) == ['last.pt']
    state = load_checkpoint(stopped / 'last.pt')
    assert (state['step'], state['finished']) == (1, False), (state['step'], state['finished'])
    assert_states_equal(state['G'], rank0['G'], 'G')

    _run_two_ranks(run_argv(data_dir, tmp_path, 'stopped', '--steps', '3', '--ckpt_every', '2',
                            '--ckpt', str(stopped / 'last.pt')), tmp_path / 'resumed_ranks')
    a = load_checkpoint(run_dir / 'checkpoints' / 'last.pt')
    b = load_checkpoint(stopped / 'last.pt')
    assert a['step'] == b['step'] == 3
    for key in ('G', 'D', 'G_ema', 'g_optim', 'd_optim', 'orth_update', 'rng_per_rank'):
        assert_states_equal(a[key], b[key], key)
    assert [r['step'] for r in read_stats(tmp_path / 'stopped')] == [1, 2, 3]


def test_ranks_split_each_global_batch():
    # A dataset of indices: every step, the 2 ranks' batches together hold the images of the
    # single-process batch, and a start inside the second epoch continues the same order.
    args = trainer.build_parser('test', 256).parse_args(['unused', *TINY])
    dataset = [torch.tensor(i) for i in range(10)]
    alone, _ = trainer.make_batches(args, DistContext(), dataset, 0, 4)
    expected = [sorted(next(alone).tolist()) for _ in range(5)]
    ranks = [trainer.make_batches(args, DistContext(rank=r, world_size=2), dataset, 0, 2)[0]
             for r in range(2)]
    together = [sorted(next(ranks[0]).tolist() + next(ranks[1]).tolist()) for _ in range(5)]
    assert together == expected
    resumed = [trainer.make_batches(args, DistContext(rank=r, world_size=2), dataset, 3, 2)[0]
               for r in range(2)]
    assert sorted(next(resumed[0]).tolist() + next(resumed[1]).tolist()) == expected[3]


@pytest.fixture
def fake_torchrun(monkeypatch):
    """torchrun's variables for rank 0 of 2; no process group is started by these tests."""
    values = dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', LOCAL_WORLD_SIZE='2',
                  MASTER_ADDR='127.0.0.1', MASTER_PORT='1')
    for name in TORCHRUN_VARIABLES:
        monkeypatch.setenv(name, values[name])


def test_batch_not_divisible_by_ranks(fake_torchrun, data_dir, tmp_path):
    with pytest.raises(UserError, match='--batch 3 .* multiple of the number of processes'):
        train(data_dir, tmp_path, 'x', '--steps', '1', '--batch', '3')
    assert not dist.is_initialized()
    assert not (tmp_path / 'x').exists(), 'a run folder was created for a bad --batch'


def test_torchrun_rejects_device_index(fake_torchrun, data_dir, tmp_path):
    with pytest.raises(UserError, match='--device cuda:1 conflicts with torchrun'):
        train(data_dir, tmp_path, 'x', '--steps', '1', '--device', 'cuda:1')
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_autocast_trains_with_finite_losses(data_dir, tmp_path, amp):
    run = train(data_dir, tmp_path, amp, '--steps', '3', '--amp', amp, '--channels_last')
    records = read_stats(run)
    assert [r['step'] for r in records] == [1, 2, 3]
    for record in records:
        losses = {k: record[k] for k in ('loss_D', 'loss_G', 'r1') if k in record}
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert sum('r1' in r for r in records) == 2, 'R1 should run at steps 0 and 2'
    state = load_checkpoint(run / 'checkpoints' / 'last.pt')
    for name in ('G', 'D'):
        values = torch.cat([v.flatten().float() for v in state[name].values()])
        assert torch.isfinite(values).all(), f'{name} has non-finite weights'
    # Only fp16 uses a loss scale; its state is saved for the resume.
    assert bool(state['g_scaler']) == (amp == 'fp16'), state['g_scaler']
    if amp == 'fp16':
        assert state['d_scaler']['scale'] > 0, state['d_scaler']


def test_fp16_resume_restores_loss_scale(data_dir, tmp_path):
    run = train(data_dir, tmp_path, 'fp16', '--steps', '1', '--amp', 'fp16')
    saved = load_checkpoint(run / 'checkpoints' / 'last.pt')['d_scaler']
    args = trainer.build_parser('test', 256).parse_args(
        run_argv(data_dir, tmp_path, 'fp16', '--amp', 'fp16', '--ckpt',
                 str(run / 'checkpoints' / 'last.pt')))
    torch.manual_seed(0)
    s = build_state(args, torch.device('cpu'))
    trainer.resume(args, DistContext(), s, trainer.load_resume_checkpoint(args))
    assert s.d_scaler.state_dict() == saved


def test_channels_last_weights():
    args = trainer.build_parser('test', 256).parse_args(['unused', *TINY, '--channels_last'])
    G, D, _ = build_models(args, torch.device('cpu'))
    weight = D.features[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last), weight.stride()


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------

SIGTERM_STEPS = 20


def test_sigterm_checkpoints_and_resume_is_exact(data_dir, tmp_path):
    run = tmp_path / 'stopped'
    argv = run_argv(data_dir, tmp_path, 'stopped', '--steps', str(SIGTERM_STEPS),
                    '--ckpt_every', '100')
    # Wait until the first step is logged, then stop the run in the middle of training.
    process = start_trainer(['eigengan/train_ffhq.py', *argv], REPO)
    result = stop_once_written(process, run / 'stats.jsonl')
    assert result.returncode == 0, f'exit status {result.returncode}: {result.stderr[-2000:]}'
    assert result.seconds < 10, f'exit took {result.seconds:.1f} s after SIGTERM'
    assert 'received SIGTERM' in result.stderr, result.stderr[-2000:]
    stopped = load_checkpoint(run / 'checkpoints' / 'last.pt')
    assert 1 <= stopped['step'] < SIGTERM_STEPS, f"stopped at step {stopped['step']}"
    assert stopped['finished'] is False
    assert f"stopped by SIGTERM after step {stopped['step']}" in result.stdout + result.stderr
    names = sorted(p.name for p in (run / 'checkpoints').iterdir())
    assert names == ['last.pt'], f'checkpoints after the stop: {names}'

    # Resume from last.pt to the end, and compare with an uninterrupted run.
    train(data_dir, tmp_path, 'stopped', '--steps', str(SIGTERM_STEPS), '--ckpt_every', '100',
          '--ckpt', str(run / 'checkpoints' / 'last.pt'))
    straight = train(data_dir, tmp_path, 'straight', '--steps', str(SIGTERM_STEPS),
                     '--ckpt_every', '100')
    a = load_checkpoint(straight / 'checkpoints' / 'last.pt')
    b = load_checkpoint(run / 'checkpoints' / 'last.pt')
    assert a['step'] == b['step'] == SIGTERM_STEPS
    for key in ('G', 'D', 'G_ema', 'g_optim', 'd_optim', 'orth_update', 'rng'):
        assert_states_equal(a[key], b[key], key)
    steps = [r['step'] for r in read_stats(run)]
    assert steps == list(range(1, SIGTERM_STEPS + 1)), f'stats.jsonl steps {steps}'


def test_sigint_stops_after_current_step(data_dir, tmp_path, monkeypatch):
    # SIGINT raised inside the discriminator step of step 2 (the third call).
    calls = []
    d_step = trainer.d_step

    def interrupted_d_step(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return d_step(*args)

    monkeypatch.setattr(trainer, 'd_step', interrupted_d_step)
    handler_before = signal.getsignal(signal.SIGINT)
    run = train(data_dir, tmp_path, 'sigint', '--steps', '10', '--ckpt_every', '100')
    assert len(calls) == 3, f'{len(calls)} steps ran'
    state = load_checkpoint(run / 'checkpoints' / 'last.pt')
    assert state['step'] == 3, state['step']
    assert state['data_position'] == {'epoch': 1, 'batches_done_in_epoch': 1}
    assert [r['step'] for r in read_stats(run)] == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is handler_before, 'SIGINT handler not restored'
