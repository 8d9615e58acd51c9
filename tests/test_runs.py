"""Tests of run folders, checkpoints, random state, devices and logging (models/runs.py)."""
import argparse
import json
import os
import random
import signal
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import runs
from models.runs import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_args(**overrides) -> argparse.Namespace:
    options = {'seed': 7, 'lr': 0.1, 'data_root': Path('/data/cifar'), 'milestones': (100, 200),
               'device': torch.device('cpu'), 'nog': True}
    options.update(overrides)
    return argparse.Namespace(**options)


def folder_snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------

def test_config_json_fields(tmp_path):
    run_dir = runs.prepare_run_dir(tmp_path / 'run', False, make_args(), ['--nog'],
                                   'cifar', 'digits', 'nog')
    config = json.loads((run_dir / 'config.json').read_text())

    expected_keys = {'family', 'dataset', 'method', 'seed', 'options', 'command', 'versions',
                     'git_commit', 'git_dirty', 'started'}
    assert expected_keys <= set(config), f"keys: {sorted(config)}"
    assert (config['family'], config['dataset'], config['method']) == ('cifar', 'digits', 'nog')
    assert config['seed'] == 7
    assert config['options'] == {'seed': 7, 'lr': 0.1, 'data_root': '/data/cifar',
                                 'milestones': [100, 200], 'device': 'cpu', 'nog': True}
    assert config['command'] == [sys.executable, '--nog']
    for name in ('python', 'torch', 'torchvision', 'numpy', 'cuda'):
        assert name in config['versions'], f"versions: {config['versions']}"
    assert config['versions']['torch'] == torch.__version__
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00', config['started']), \
        config['started']


@pytest.mark.skipif(not (REPO_ROOT / '.git').exists(), reason='not a git checkout')
def test_config_records_git_commit(tmp_path):
    run_dir = runs.prepare_run_dir(tmp_path / 'run', False, make_args(), [], 'cifar',
                                   'cifar100', 'baseline')
    config = json.loads((run_dir / 'config.json').read_text())
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert config['git_commit'] == head, f"{config['git_commit']} != {head}"
    assert isinstance(config['git_dirty'], bool), config['git_dirty']


@pytest.mark.parametrize('resume_flag', ['--resume', '--continue_train'])
def test_existing_run_rejected_untouched(tmp_path, resume_flag):
    run_dir = tmp_path / 'run'
    runs.prepare_run_dir(run_dir, False, make_args(), [], 'cifar', 'digits', 'nog')
    runs.save_checkpoint(run_dir / 'checkpoint.pt', {'epoch': 3})
    before = folder_snapshot(run_dir)

    with pytest.raises(UserError) as info:
        runs.prepare_run_dir(run_dir, False, make_args(lr=0.5), [], 'cifar', 'digits', 'nog',
                             resume_flag=resume_flag)
    assert resume_flag in str(info.value), str(info.value)
    assert str(run_dir) in str(info.value), str(info.value)
    assert folder_snapshot(run_dir) == before


def test_empty_existing_folder_accepted(tmp_path):
    run_dir = runs.prepare_run_dir(tmp_path, False, make_args(), [], 'cifar', 'digits', 'ow')
    assert (run_dir / 'config.json').is_file()


def test_resume_appends_resumes_jsonl(tmp_path):
    run_dir = tmp_path / 'run'
    runs.prepare_run_dir(run_dir, False, make_args(), [], 'cifar', 'digits', 'nog')
    config_before = (run_dir / 'config.json').read_bytes()

    runs.prepare_run_dir(run_dir, True, make_args(), ['--resume'], 'cifar', 'digits', 'nog')
    runs.prepare_run_dir(run_dir, True, make_args(lr=0.01), ['--resume'], 'cifar', 'digits',
                         'nog')

    assert (run_dir / 'config.json').read_bytes() == config_before
    lines = (run_dir / 'resumes.jsonl').read_text().splitlines()
    assert len(lines) == 2, f"{len(lines)} lines"
    first, second = (json.loads(line) for line in lines)
    assert first['command'] == [sys.executable, '--resume']
    assert first['changed_options'] == {}
    assert second['changed_options'] == {'lr': {'was': 0.1, 'now': 0.01}}


def test_resume_without_config_rejected(tmp_path):
    with pytest.raises(UserError) as info:
        runs.prepare_run_dir(tmp_path / 'missing', True, make_args(), [], 'cifar', 'digits',
                             'nog')
    assert 'config.json' in str(info.value), str(info.value)
    assert not (tmp_path / 'missing').exists()


def test_to_plain_converts_objects():
    plain = runs.to_plain({'path': Path('a/b'), 'pair': (1, 2), 'np': np.float32(0.5),
                           'scalar': torch.tensor(3), 'nan': float('nan'), 1: None})
    assert plain == {'path': 'a/b', 'pair': [1, 2], 'np': 0.5, 'scalar': 3, 'nan': 'nan',
                     '1': None}
    json.dumps(plain, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Checkpoints and JSON files
# ---------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_weights_only(tmp_path):
    state = {'model': {'w': torch.arange(6.0).reshape(2, 3)}, 'epoch': 4, 'name': 'nog',
             'lrs': [0.1, 0.01], 'done': False, 'best': None}
    runs.save_checkpoint(tmp_path / 'ckpt.pt', state)
    loaded = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert torch.equal(loaded['model']['w'], state['model']['w'])
    assert {k: v for k, v in loaded.items() if k != 'model'} == \
        {k: v for k, v in state.items() if k != 'model'}


def test_checkpoint_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        runs.save_checkpoint(tmp_path / 'ckpt.pt', {'epoch': 1})
    finally:
        os.umask(umask)
    mode = (tmp_path / 'ckpt.pt').stat().st_mode & 0o777
    assert mode == 0o644, oct(mode)


def test_checkpoint_crash_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    runs.save_checkpoint(path, {'epoch': 1, 'w': torch.ones(3)})

    def save_then_crash(obj, file, *args, **kwargs):
        file.write(b'half a checkpoint')
        raise RuntimeError('killed during save')

    monkeypatch.setattr(torch, 'save', save_then_crash)
    with pytest.raises(RuntimeError, match='killed during save'):
        runs.save_checkpoint(path, {'epoch': 2, 'w': torch.zeros(3)})
    monkeypatch.undo()

    loaded = runs.load_checkpoint(path)
    assert loaded['epoch'] == 1, loaded
    assert torch.equal(loaded['w'], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']


def test_load_checkpoint_missing(tmp_path):
    path = tmp_path / 'nothing_here.pt'
    with pytest.raises(UserError) as info:
        runs.load_checkpoint(path)
    assert str(path) in str(info.value), str(info.value)
    assert 'not found' in str(info.value), str(info.value)


@pytest.mark.parametrize('damage', ['random_bytes', 'truncated', 'empty'])
def test_load_checkpoint_corrupted(tmp_path, damage):
    path = tmp_path / 'ckpt.pt'
    runs.save_checkpoint(path, {'w': torch.randn(64, 64), 'epoch': 9})
    data = path.read_bytes()
    # 300 random files of the same size: in torch 2.14 the unpickler raised UnpicklingError,
    # IndexError, KeyError and UnicodeDecodeError on these seeds.
    if damage == 'random_bytes':
        damaged = [random.Random(seed).randbytes(len(data)) for seed in range(300)]
    else:
        damaged = [{'truncated': data[:len(data) // 2], 'empty': b''}[damage]]
    for content in damaged:
        path.write_bytes(content)
        with pytest.raises(UserError) as info:
            runs.load_checkpoint(path)
        assert str(path) in str(info.value), str(info.value)
        assert 'corrupted' in str(info.value), str(info.value)


@pytest.mark.parametrize('content', [argparse.Namespace(lr=0.1), torch.ones(2)],
                         ids=['namespace', 'tensor'])
def test_load_checkpoint_foreign_content(tmp_path, content):
    path = tmp_path / 'foreign.pt'
    torch.save(content, path)
    with pytest.raises(UserError) as info:
        runs.load_checkpoint(path)
    assert str(path) in str(info.value), str(info.value)


def test_update_metrics_merges_keys(tmp_path):
    runs.update_metrics(tmp_path, fid={'value': 12.5, 'settings': {'n': 10000}})
    runs.update_metrics(tmp_path, vp_mean={'value': 0.5, 'settings': {}},
                        vp_std={'value': 0.01, 'settings': {}})
    runs.update_metrics(tmp_path, fid={'value': 11.0, 'settings': {'n': 50000}})

    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert set(metrics) == {'fid', 'vp_mean', 'vp_std'}, sorted(metrics)
    assert metrics['fid'] == {'value': 11.0, 'settings': {'n': 50000}}
    assert metrics['vp_mean']['value'] == 0.5


def test_update_metrics_invalid_file_untouched(tmp_path):
    (tmp_path / 'metrics.json').write_text('{"fid": ')
    with pytest.raises(UserError) as info:
        runs.update_metrics(tmp_path, ppl={'value': 1.0, 'settings': {}})
    assert 'metrics.json' in str(info.value), str(info.value)
    assert (tmp_path / 'metrics.json').read_text() == '{"fid": '


# ---------------------------------------------------------------------------------------------
# Random state and seeding
# ---------------------------------------------------------------------------------------------

def draw_from_every_generator() -> list:
    return [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(3).tolist(), torch.randn(2).tolist()]


def test_rng_state_weights_only_round_trip(tmp_path):
    runs.seed_everything(11)
    random.gauss(0, 1)  # leaves a cached second normal in both generators
    np.random.standard_normal()
    runs.save_checkpoint(tmp_path / 'rng.pt', {'rng': runs.get_rng_state()})
    expected = draw_from_every_generator()

    runs.seed_everything(12345)
    state = torch.load(tmp_path / 'rng.pt', weights_only=True)['rng']
    runs.set_rng_state(state)
    assert draw_from_every_generator() == expected


def test_seed_everything_repeats_streams():
    runs.seed_everything(3)
    first = draw_from_every_generator()
    runs.seed_everything(3)
    assert draw_from_every_generator() == first
    runs.seed_everything(4)
    assert draw_from_every_generator() != first


# ---------------------------------------------------------------------------------------------
# Devices and method names
# ---------------------------------------------------------------------------------------------

def test_select_device_cpu_and_auto():
    assert runs.select_device('cpu') == torch.device('cpu')
    expected = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert runs.select_device('auto').type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_select_device_cuda_without_cuda():
    with pytest.raises(UserError, match='CUDA is not available'):
        runs.select_device('cuda')


def test_select_device_invalid_name():
    with pytest.raises(UserError, match='invalid --device'):
        runs.select_device('gpu0')


@pytest.mark.parametrize('flags, name', [
    ({}, 'baseline'), ({'nog': True}, 'nog'), ({'olr': True}, 'olr'), ({'ow': True}, 'ow'),
    ({'nog': True, 'ow': True}, 'nog_ow'), ({'olr': True, 'ow': True}, 'olr_ow'),
    ({'nog': True, 'olr': True, 'ow': True}, 'nog_olr_ow')])
def test_method_name(flags, name):
    assert runs.method_name(**flags) == name


# ---------------------------------------------------------------------------------------------
# run_main
# ---------------------------------------------------------------------------------------------

def raise_user_error(argv):
    raise UserError('--lr must be positive, got -1')


def raise_interrupt(argv):
    raise KeyboardInterrupt


@pytest.mark.parametrize('main, code', [
    (lambda argv: None, 0), (lambda argv: 3, 3), (raise_user_error, 2), (raise_interrupt, 130)],
    ids=['none', 'three', 'user_error', 'interrupt'])
def test_run_main_exit_codes(main, code, capsys):
    with pytest.raises(SystemExit) as info:
        runs.run_main(main)
    assert info.value.code == code, f"exit code {info.value.code}"
    if code == 2:
        assert capsys.readouterr().err == 'error: --lr must be positive, got -1\n'


def test_run_main_command_line(tmp_path):
    script = tmp_path / 'fail.py'
    script.write_text(
        'import sys\n'
        f'sys.path.insert(0, {str(REPO_ROOT)!r})\n'
        'from models.runs import UserError, run_main\n'
        'def main(argv=None):\n'
        '    raise UserError(f"missing file {sys.argv[1]}")\n'
        'run_main(main)\n')
    result = subprocess.run([sys.executable, str(script), 'data.bin'], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, f"exit status {result.returncode}: {result.stderr}"
    assert result.stderr == 'error: missing file data.bin\n', result.stderr
    assert result.stdout == ''


# ---------------------------------------------------------------------------------------------
# RunLogger
# ---------------------------------------------------------------------------------------------

def test_run_logger_writes_stats_and_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with runs.RunLogger(tmp_path) as logger:
        for epoch in range(3):
            logger.scalars(epoch, {'train/loss': 1.0 / (epoch + 1), 'kappa': 10.0 ** epoch})
            logger.stats({'epoch': epoch, 'train_loss': 1.0 / (epoch + 1), 'lr': np.float64(0.1)})

    records = [json.loads(line) for line in (tmp_path / 'stats.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1, 2]
    assert records[2]['lr'] == 0.1

    assert list((tmp_path / 'tb').glob('events.out.tfevents.*')), 'no TensorBoard event file'
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    kappa = [(e.step, e.value) for e in events.Scalars('kappa')]
    assert kappa == [(0, 1.0), (1, 10.0), (2, 100.0)], kappa


def test_run_logger_purge_key_drops_later_records(tmp_path):
    with runs.RunLogger(tmp_path) as logger:
        for epoch in range(5):
            logger.stats({'epoch': epoch})
    with open(tmp_path / 'stats.jsonl', 'a') as file:
        file.write('{"epoch": 5, "train_lo')  # a line cut short by a kill

    with runs.RunLogger(tmp_path, purge_step=3, purge_key='epoch') as logger:
        logger.stats({'epoch': 3})
    epochs = [json.loads(line)['epoch']
              for line in (tmp_path / 'stats.jsonl').read_text().splitlines()]
    assert epochs == [0, 1, 2, 3], epochs


def test_run_logger_ends_cut_line(tmp_path):
    (tmp_path / 'stats.jsonl').write_text('{"epoch": 0}\n{"epoch": 1, "lo')
    with runs.RunLogger(tmp_path) as logger:
        logger.stats({'epoch': 1})
    lines = (tmp_path / 'stats.jsonl').read_text().splitlines()
    assert lines[-1] == '{"epoch": 1}', lines


def test_run_logger_disabled_writes_nothing(tmp_path):
    logger = runs.RunLogger(tmp_path / 'run', enabled=False)
    logger.scalars(0, {'loss': 1.0})
    logger.stats({'epoch': 0})
    logger.close()
    assert not (tmp_path / 'run').exists()


def test_run_dir_under_a_file_is_user_error(tmp_path):
    blocker = tmp_path / 'afile'
    blocker.write_text('not a folder')
    args = argparse.Namespace(seed=0)
    with pytest.raises(UserError, match='cannot create run folder'):
        runs.prepare_run_dir(blocker / 'run', resume=False, args=args, argv=[], family='cifar',
                        dataset='digits', method='baseline')
    assert blocker.read_text() == 'not a folder'


def test_ctrl_c_waits_for_checkpoint_write(tmp_path):
    # SIGINT arrives halfway through the write: the file is completed and moved into place,
    # then KeyboardInterrupt is raised, with the previous handler back in place.
    path = tmp_path / 'ckpt.bin'
    handler = signal.getsignal(signal.SIGINT)

    def write(file):
        file.write(b'first half ')
        signal.raise_signal(signal.SIGINT)
        file.write(b'second half')

    with pytest.raises(KeyboardInterrupt):
        runs._write_atomic(path, write)
    assert path.read_bytes() == b'first half second half'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.bin'], 'temporary file left'
    assert signal.getsignal(signal.SIGINT) is handler
