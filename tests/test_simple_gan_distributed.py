"""Tests of the vanilla GAN trainer with 2 processes (gloo on 127.0.0.1), mixed precision and
preemption. CPU only, tiny networks (--width_mult 1/64) and 8 synthetic images.

The 2-process runs call ``simple_gan.train.main`` in forked children with the variables that
torchrun sets, so they skip torchrun's own start-up and the import of torch in each child.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from models.runs import UserError, load_checkpoint
from simple_gan import train
from simple_gan.devices import gpu_ids_flag
from simple_gan.trainer import build_training, generator_step, train_step
from tests.state_checks import assert_states_equal
from tests.test_simple_gan import TINY, tiny_args, write_faces
from tests.two_ranks import WORLD_SIZE, run_two_ranks

pytestmark = pytest.mark.usefixtures('one_thread')

N_IMAGES = 8
# Global batch 4: 2 images per rank, 2 steps per epoch, so 5 steps cross two epoch ends.
STEPS = 5
STOP_AT = 3
STATE_KEYS = ('G', 'D', 'opt_G', 'opt_D', 'sched_G', 'sched_D', 'orth', 'd_scaler', 'g_scaler',
              'step', 'epoch', 'epoch_step', 'data_order', 'rng', 'rng_per_rank')


@pytest.fixture(scope='module')
def faces(tmp_path_factory) -> Path:
    return write_faces(tmp_path_factory.mktemp('data') / 'faces', n=N_IMAGES)


def run_argv(faces: Path, checkpoints_dir: Path, name: str, *extra: str) -> list[str]:
    return ['--dataset_mode', 'celeba', '--dataroot', str(faces), '--reg_type', 'nog_olr',
            '--checkpoints_dir', str(checkpoints_dir), '--name', name, '--num_threads', '0',
            '--n_epochs', '1', '--n_epochs_decay', '3', '--save_epoch_freq', '1', *TINY,
            *extra]


def _rank_worker(rank: int, argv: list[str], out_dir: str, stop_at: int) -> None:
    """Run train.main as one torchrun rank; save this rank's final state to out_dir.

    With ``stop_at`` > 0, rank 1 sends itself SIGTERM during that step, as a scheduler would.
    """

    def step_and_signal(t, real_img, args):
        record = train_step(t, real_img, args)
        if rank == 1 and t.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    run_training = train.train

    def train_and_capture(t, loader, run_dir, logger, args, preemption):
        reason = run_training(t, loader, run_dir, logger, args, preemption)
        t.sampler.set_epoch(t.epoch)
        torch.save({'G': t.G.state_dict(), 'D': t.D.state_dict(), 'step': t.step,
                    'reason': reason, 'torch_rng': torch.get_rng_state(),
                    'epoch_indices': list(t.sampler)}, f'{out_dir}/rank{rank}.pt')
        return reason

    train.train = train_and_capture
    train.train_step = step_and_signal
    status = train.main(argv)
    Path(out_dir, f'status{rank}.json').write_text(json.dumps(status))


def train_two_ranks(argv: list[str], out_dir: Path, stop_at: int = 0,
                    timeout: float = 120.0) -> list[dict]:
    """Fork 2 ranks running ``argv``; return each rank's captured state and exit status."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exit_codes = run_two_ranks(_rank_worker, argv, str(out_dir), stop_at, timeout=timeout)
    results = []
    for rank, exit_code in enumerate(exit_codes):
        result = torch.load(out_dir / f'rank{rank}.pt', weights_only=True)
        result['status'] = json.loads((out_dir / f'status{rank}.json').read_text())
        result['exitcode'] = exit_code
        results.append(result)
    return results


@pytest.fixture(scope='module')
def runs(faces, tmp_path_factory) -> dict:
    """An uninterrupted 2-rank run of STEPS steps, and one stopped by SIGTERM then resumed."""
    tmp = tmp_path_factory.mktemp('two_ranks')
    ck = tmp / 'ck'
    whole = train_two_ranks(run_argv(faces, ck, 'whole', '--max_steps', str(STEPS)),
                            tmp / 'out_whole')
    stopped = train_two_ranks(run_argv(faces, ck, 'split', '--max_steps', str(STEPS)),
                              tmp / 'out_stopped', stop_at=STOP_AT)
    stopped_state = load_checkpoint(ck / 'split' / 'latest.pt')
    resumed = train_two_ranks(run_argv(faces, ck, 'split', '--max_steps', str(STEPS),
                                       '--continue_train'), tmp / 'out_resumed')
    return {'ck': ck, 'whole': whole, 'stopped': stopped, 'stopped_state': stopped_state,
            'resumed': resumed}


def test_ranks_end_with_identical_weights(runs):
    rank0, rank1 = runs['whole']
    assert rank0['step'] == rank1['step'] == STEPS, f"steps {rank0['step']}, {rank1['step']}"
    assert_states_equal(rank0['G'], rank1['G'], 'G')
    assert_states_equal(rank0['D'], rank1['D'], 'D')
    checkpoint = load_checkpoint(runs['ck'] / 'whole' / 'latest.pt')
    assert_states_equal(checkpoint['G'], rank1['G'], 'checkpoint G vs rank 1')


def test_ranks_split_data_and_noise(runs):
    rank0, rank1 = runs['whole']
    first, second = set(rank0['epoch_indices']), set(rank1['epoch_indices'])
    assert not first & second, f"ranks share images {sorted(first & second)}"
    assert first | second == set(range(N_IMAGES)), f"epoch covers {sorted(first | second)}"
    assert not torch.equal(rank0['torch_rng'], rank1['torch_rng']), "ranks share one RNG state"


def test_rank0_writes_one_run_folder(runs):
    run_dir = runs['ck'] / 'whole'
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ['config.json', 'epoch_0001.pt', 'epoch_0002.pt', 'images', 'latest.pt',
                     'stats.jsonl', 'tb'], f"run folder contains {names}"
    steps = [json.loads(line)['step'] for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"stats.jsonl steps {steps}"
    assert len(list((run_dir / 'images').iterdir())) == 1
    assert len(list(runs['ck'].iterdir())) == 2, "a run folder per run, none per rank"


def test_sigterm_stops_every_rank(runs):
    for rank, result in enumerate(runs['stopped']):
        assert result['exitcode'] == 0, f"rank {rank} exit code {result['exitcode']}"
        assert result['status'] == 0, f"rank {rank} main returned {result['status']}"
        assert result['step'] == STOP_AT, f"rank {rank} stopped at step {result['step']}"
    reasons = [result['reason'] for result in runs['stopped']]
    assert reasons == ['a signal to another rank', 'SIGTERM'], f"stop reasons {reasons}"
    state = runs['stopped_state']
    position = (state['step'], state['epoch'], state['epoch_step'])
    assert position == (STOP_AT, 2, 1), f"(step, epoch, epoch_step) {position}"
    assert len(state['rng_per_rank']) == WORLD_SIZE


def test_stopped_and_resumed_equals_uninterrupted(runs):
    whole = load_checkpoint(runs['ck'] / 'whole' / 'latest.pt')
    split = load_checkpoint(runs['ck'] / 'split' / 'latest.pt')
    for key in STATE_KEYS:
        assert_states_equal(whole[key], split[key], key)
    steps = [json.loads(line)['step'] for line in (runs['ck'] / 'split' / 'stats.jsonl').read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"stats.jsonl steps {steps}"


# ---------------------------------------------------------------------------------------------
# Flags under torchrun, checked before the rendezvous
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_torchrun(monkeypatch):
    """torchrun's variables for rank 0 of 2, without any other process."""
    for name, value in dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', LOCAL_WORLD_SIZE='2',
                            MASTER_ADDR='127.0.0.1', MASTER_PORT='1').items():
        monkeypatch.setenv(name, value)


def test_batch_not_divisible_by_ranks(fake_torchrun, faces, tmp_path):
    argv = run_argv(faces, tmp_path, 'run', '--batch_size', '5')
    with pytest.raises(UserError, match='--batch_size 5 is the global batch'):
        train.main(argv)
    assert not (tmp_path / 'run').exists()


def test_torchrun_rejects_device_index(fake_torchrun, faces, tmp_path):
    argv = run_argv(faces, tmp_path, 'run', '--device', 'cuda:1')
    with pytest.raises(UserError, match='conflicts with torchrun'):
        train.main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message without CUDA')
def test_gpu_ids_without_cuda_is_an_error(faces, tmp_path):
    argv = [arg for arg in run_argv(faces, tmp_path, 'run') if arg not in ('--device', 'cpu')]
    with pytest.raises(UserError, match='--gpu_ids 0 requests a GPU but CUDA is not available'):
        train.main([*argv, '--gpu_ids', '0'])
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('gpu_ids', ['a', '-2', '-1,0', ''])
def test_invalid_gpu_ids_is_a_parser_error(gpu_ids, capsys):
    parser = train.build_parser()
    with pytest.raises(SystemExit):
        gpu_ids_flag(parser, gpu_ids)
    assert '--gpu_ids must be comma-separated GPU ids' in capsys.readouterr().err


def test_gpu_ids_minus_one_is_the_cpu():
    assert gpu_ids_flag(train.build_parser(), '-1') == 'cpu'


# ---------------------------------------------------------------------------------------------
# Mixed precision and channels-last
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('amp, reg_type', [('bf16', 'hp'), ('fp16', 'nog_olr')])
def test_autocast_trains_with_finite_losses(faces, tmp_path, amp, reg_type):
    argv = run_argv(faces, tmp_path, 'run', '--max_steps', '3', '--amp', amp)
    argv[argv.index('--reg_type') + 1] = reg_type
    assert train.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / 'run' / 'stats.jsonl').read_text().splitlines()]
    assert len(records) == 3, f"{len(records)} records"
    for key in ('loss_D', 'loss_D_gp', 'loss_G', 'loss_G_reg'):
        values = [record[key] for record in records]
        assert all(abs(v) < float('inf') for v in values), f"{key}: {values}"
    state = load_checkpoint(tmp_path / 'run' / 'latest.pt')
    for name, p in state['G'].items():
        assert p.dtype == torch.float32, f"G.{name} is {p.dtype}"
        assert torch.isfinite(p).all(), f"G.{name} is not finite"
    if amp == 'fp16':
        assert state['g_scaler']['scale'] > 0, f"g_scaler state {state['g_scaler']}"


def test_fp16_resume_restores_scalers(faces, tmp_path):
    common = ['--amp', 'fp16']
    assert train.main(run_argv(faces, tmp_path, 'whole', '--max_steps', '3', *common)) == 0
    assert train.main(run_argv(faces, tmp_path, 'split', '--max_steps', '2', *common)) == 0
    assert train.main(run_argv(faces, tmp_path, 'split', '--max_steps', '3', '--continue_train',
                               *common)) == 0
    whole = load_checkpoint(tmp_path / 'whole' / 'latest.pt')
    split = load_checkpoint(tmp_path / 'split' / 'latest.pt')
    assert whole['g_scaler']['_growth_tracker'] == 3, f"g_scaler {whole['g_scaler']}"
    for key in ('G', 'D', 'opt_G', 'opt_D', 'd_scaler', 'g_scaler', 'rng'):
        assert_states_equal(whole[key], split[key], key)


@pytest.mark.parametrize('reg_type', ['orojar', 'hp'])
def test_regularizer_runs_in_float32_under_autocast(reg_type):
    # The finite differences run outside autocast, so bf16 gives the float32 value exactly.
    values = []
    for amp in ('off', 'bf16'):
        torch.manual_seed(0)
        args = tiny_args(reg_type=reg_type, amp=amp)
        t = build_training(args, n_images=16, device=torch.device('cpu'))
        z = torch.randn(4, args.nz)
        torch.manual_seed(1)
        values.append(generator_step(t, z, t.G(z), args)['loss_G_reg'])
    assert values[0] == values[1], f"penalty off {values[0]!r} vs bf16 {values[1]!r}"


def test_channels_last_matches_default():
    states = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        args = tiny_args(reg_type='nog_olr', channels_last=channels_last)
        t = build_training(args, n_images=16, device=torch.device('cpu'))
        real_img = torch.rand(4, 3, 64, 64) * 2 - 1
        if channels_last:
            real_img = real_img.contiguous(memory_format=torch.channels_last)
        train_step(t, real_img, args)
        states.append(t)
    default, last = states
    assert last.G.first.weight.is_contiguous(memory_format=torch.channels_last)
    for name, p in default.G.state_dict().items():
        diff = (p - last.G.state_dict()[name]).abs().max()
        assert diff < 1e-5, f"G.{name}: max diff {diff} between memory formats"
