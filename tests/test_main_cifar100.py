"""The CIFAR trainer end to end on tiny data: flags, run folders, OLR groups and resume."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_cifar100
from cifar_folders import write_cifar100_folder
from models.orthogonality import optimal_learning_rate
from models.resnet import cifar_resnet
from models.runs import UserError
from tests.state_checks import assert_states_equal

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = "python main_cifar100.py --norm='zcanormbatch' --batch_size=128 --nog --olr --ow"
STATS_KEYS = {'epoch', 'train_loss', 'train_acc', 'test_acc', 'test_acc_running', 'test_error',
              'kappa', 'kappa_raw', 'rank', 'lr', 'olr_eta', 'nog_skips', 'time'}


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory):
    """A CIFAR-100 pickle folder with 64 training and 16 test images, as the archive has it."""
    return write_cifar100_folder(tmp_path_factory.mktemp('data'), 64, 16)


def tiny_args(cifar_root, run_dir, *extra):
    """Flags for ResNet-18 with the meta-layer on the tiny CIFAR-100 folder, 4 images a batch."""
    return ['--dataset', 'cifar100', '--data_root', str(cifar_root), '--no_download',
            '--arch', 'resnet18', '--norm', 'zcanormbatch', '--batch_size', '4',
            '--workers', '0', '--max_batches', '1', '--no_progress', '--log_interval', '1',
            '--run_dir', str(run_dir), *extra]


def run_script(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    return subprocess.run([sys.executable, str(REPO / 'main_cifar100.py'), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('flags', [[], ['--nog'], ['--olr'], ['--ow'], ['--nog', '--olr'],
                                   ['--nog', '--ow'], ['--olr', '--ow'],
                                   ['--nog', '--olr', '--ow']], ids=' '.join)
def test_dry_run_every_method(cifar_root, tmp_path, flags, capsys):
    run_dir = tmp_path / 'run'
    assert main_cifar100.main(tiny_args(cifar_root, run_dir, '--dry_run', *flags)) == 0
    stdout = capsys.readouterr().out

    assert 'no run folder was created' in stdout, stdout
    status = next(line for line in stdout.splitlines() if line.startswith('epoch'))
    eta = status.split('eta*')[1].split('|')[0].strip()
    if '--olr' in flags:
        assert 0 < float(eta) <= 0.1, f"eta* {eta!r} in {status!r}"
    else:
        assert eta == '-', f"eta* {eta!r} without --olr"
    assert not run_dir.exists(), f"the dry run created {sorted(run_dir.iterdir())}"


def test_dry_run_command_line(cifar_root, tmp_path):
    run_dir = tmp_path / 'run'
    result = run_script(*tiny_args(cifar_root, run_dir, '--dry_run', '--nog', '--olr', '--ow'))
    assert result.returncode == 0, result.stderr
    assert 'no run folder was created' in result.stdout, result.stdout
    assert not run_dir.exists(), f"the dry run created {sorted(run_dir.iterdir())}"


def test_digits_epoch_writes_run_folder(tmp_path):
    run_dir = tmp_path / 'digits'
    argv = ['--dataset', 'digits', '--arch', 'resnet18', '--norm', 'zcanormbatch', '--nog',
            '--olr', '--ow', '--epochs', '1', '--lr', '0.02', '--batch_size', '8',
            '--max_batches', '2', '--workers', '0', '--no_progress', '--run_dir', str(run_dir)]
    assert main_cifar100.main(argv) == 0

    records = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    assert len(records) == 1, f"{len(records)} records"
    record = records[0]
    assert STATS_KEYS <= record.keys(), f"missing {STATS_KEYS - record.keys()}"
    assert record['epoch'] == 1, f"epoch {record['epoch']}"
    assert record['recomputed'] is True, "statistics not recomputed in a short run"
    assert 0 <= record['test_acc'] <= 100, f"test_acc {record['test_acc']}"
    assert record['test_error'] == 100 - record['test_acc'], f"test_error {record['test_error']}"
    assert record['kappa'] >= 1, f"kappa {record['kappa']}"
    # OLR sets the stem group's learning rate to eta*, a float at most the base rate.
    assert isinstance(record['olr_eta'], float) and record['olr_eta'] == record['lr_pre_svd']
    assert 0 < record['olr_eta'] <= 0.02, f"eta* {record['olr_eta']}"

    config = json.loads((run_dir / 'config.json').read_text())
    assert (config['family'], config['dataset'], config['method']) == \
        ('cifar', 'digits', 'nog_olr_ow')
    assert any((run_dir / 'tb').iterdir()), "no TensorBoard events"
    for name in ('last.pt', 'best.pt'):
        state = torch.load(run_dir / name, weights_only=True)
        assert state['epoch'] == 1, f"{name}: epoch {state['epoch']}"
        assert state['options']['dataset'] == 'digits', f"{name}: {state['options']}"


def test_published_command_parses():
    argv = shlex.split(PUBLISHED)[2:]
    args = main_cifar100.build_parser().parse_args(argv)
    assert (args.norm, args.batch_size, args.nog, args.olr, args.ow) == \
        ('zcanormbatch', 128, True, True, True)
    assert (args.dataset, args.arch, args.epochs, args.lr) == ('cifar100', 'resnet50', 350, 0.1)
    assert (args.lr_step, args.lr_gamma, args.momentum, args.weight_decay) == \
        (100, 0.1, 0.9, 5e-4)
    assert (args.groups, args.eps, args.svd_backend) == (1, 1e-2, 'svd')


def test_olr_group_holds_pre_svd_param():
    torch.manual_seed(0)
    args = main_cifar100.build_parser().parse_args(['--nog', '--olr', '--ow'])
    model = cifar_resnet('resnet18', 10, norm='zcanormbatch', ow=True)
    optimizer, _ = main_cifar100.build_optimizer(model, args)
    updater = main_cifar100.build_orthogonal_update(model, optimizer, args)

    stem_groups = [g for g in optimizer.param_groups if any(p is model.pre_svd_param
                                                            for p in g['params'])]
    assert len(stem_groups) == 1, f"the stem weight is in {len(stem_groups)} groups"
    group = stem_groups[0]
    assert len(group['params']) == 1, f"the stem group has {len(group['params'])} parameters"
    assert group['params'][0] is model.pre_svd_param
    total = sum(len(g['params']) for g in optimizer.param_groups)
    assert total == len(list(model.parameters())), f"{total} parameters in the groups"

    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    assert updater.apply(0.1)
    w, grad = model.pre_svd_param.detach(), model.pre_svd_param.grad
    expected, _ = optimal_learning_rate(w, grad, 0.1)
    assert type(group['lr']) is float, f"lr is a {type(group['lr']).__name__}"
    assert group['lr'] == expected, f"lr {group['lr']} != eta* {expected}"
    a, b, c = (w * w).sum().item(), (grad * w).sum().item(), (grad * grad).sum().item()
    eta = a * b / (a * c + 2 * b * b)
    assert group['lr'] == pytest.approx(eta if 0 < eta < 0.1 else 0.1, rel=1e-6)


def load_state(run_dir):
    return torch.load(run_dir / 'last.pt', weights_only=True)


def test_resume_equals_uninterrupted_run(cifar_root, tmp_path):
    flags = ['--nog', '--olr', '--ow', '--lr', '0.02']
    once, resumed = tmp_path / 'once', tmp_path / 'resumed'
    assert main_cifar100.main(tiny_args(cifar_root, once, '--epochs', '2', *flags)) == 0
    assert main_cifar100.main(tiny_args(cifar_root, resumed, '--epochs', '1', *flags)) == 0
    assert main_cifar100.main(tiny_args(cifar_root, resumed, '--epochs', '2', '--resume',
                                        *flags)) == 0

    state_once, state_resumed = load_state(once), load_state(resumed)
    assert state_once['epoch'] == state_resumed['epoch'] == 2
    for key in ('model', 'optimizer', 'scheduler', 'orthogonal_update', 'rng',
                'loader_generator', 'global_step', 'best_acc'):
        assert_states_equal(state_once[key], state_resumed[key], key)
    buffers = [name for name in state_once['model'] if 'running_whitening' in name
               or name.startswith('conv1.u_')]
    assert buffers, "no whitening or power-iteration buffers in the state"
    assert any(state['momentum_buffer'] is not None
               for state in state_once['optimizer']['state'].values())

    lines = (resumed / 'stats.jsonl').read_text().splitlines()
    assert [json.loads(line)['epoch'] for line in lines] == [1, 2]
    assert len((resumed / 'resumes.jsonl').read_text().splitlines()) == 1

    # A resume with other optimiser options is rejected and leaves the folder as it was.
    before = sorted(p.name for p in resumed.iterdir())
    with pytest.raises(UserError, match='--lr'):
        main_cifar100.main(tiny_args(cifar_root, resumed, '--epochs', '3', '--resume',
                                     '--nog', '--olr', '--ow', '--lr', '0.05'))
    assert sorted(p.name for p in resumed.iterdir()) == before
    assert len((resumed / 'resumes.jsonl').read_text().splitlines()) == 1


def test_missing_data_is_clear_error(tmp_path):
    empty = tmp_path / 'nothing here'
    result = run_script('--data_root', str(empty), '--no_download', '--arch', 'resnet18',
                        '--run_dir', str(tmp_path / 'run'))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error:'), result.stderr
    assert str(empty) in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('flag, value', [('--groups', '3'), ('--groups', '0'),
                                         ('--batch_size', '0'), ('--epochs', '-1'),
                                         ('--lr', '-0.1'), ('--workers', '-1')])
def test_invalid_flag_value_rejected(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_cifar100.main([flag, value, '--dataset', 'digits'])
    assert exit_info.value.code == 2, f"exit code {exit_info.value.code}"
    assert flag in capsys.readouterr().err


def test_corrupted_checkpoint_is_clear_error(cifar_root, tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'config.json').write_text('{}')
    (run_dir / 'last.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='last.pt'):
        main_cifar100.main(tiny_args(cifar_root, run_dir, '--resume'))
    assert (run_dir / 'last.pt').read_bytes() == b'not a checkpoint'
    assert sorted(p.name for p in run_dir.iterdir()) == ['config.json', 'last.pt']


def test_resume_without_checkpoint_is_clear_error(cifar_root, tmp_path):
    with pytest.raises(UserError, match='run folder .*absent does not exist'):
        main_cifar100.main(tiny_args(cifar_root, tmp_path / 'absent', '--resume'))
    assert not (tmp_path / 'absent').exists()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='last.pt not found'):
        main_cifar100.main(tiny_args(cifar_root, tmp_path / 'empty', '--resume'))
    assert list((tmp_path / 'empty').iterdir()) == []


def test_existing_run_folder_needs_resume(cifar_root, tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'notes.txt').write_text('keep me')
    with pytest.raises(UserError, match='--resume'):
        main_cifar100.main(tiny_args(cifar_root, run_dir))
    assert sorted(p.name for p in run_dir.iterdir()) == ['notes.txt']
    assert (run_dir / 'notes.txt').read_text() == 'keep me'
