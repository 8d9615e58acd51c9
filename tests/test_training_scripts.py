"""Tests of training_scripts/: syntax, argument handling (with a stub interpreter) and an end
to end run of the CelebA scripts and the LSUN dump on tiny data (real interpreter, CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_simple_gan import write_faces

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / 'training_scripts').glob('*.sh'))
ENTRY_SCRIPTS = [p for p in SCRIPTS if p.name != 'common.sh']
TINY_TRAIN = ['--model', 'gan', '--width_mult', '0.015625', '--nz', '4', '--batch_size', '4',
              '--num_threads', '0', '--device', 'cpu', '--print_freq', '1']


def run_script(name: str, *args: str, env: dict, timeout: int = 300):
    result = subprocess.run(['bash', str(REPO / 'training_scripts' / name), *args],
                            env={**os.environ, 'OMP_NUM_THREADS': '1', **env},
                            capture_output=True, text=True,
                            timeout=timeout)
    return result, result.stdout + result.stderr


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('script', ENTRY_SCRIPTS, ids=lambda p: p.name)
def test_header_and_strict_mode(script):
    text = script.read_text()
    assert text.startswith('#!/usr/bin/env bash\n#SBATCH'), "no shebang and SLURM header"
    assert '# Usage:' in text
    assert 'set -euo pipefail' in text


@pytest.fixture
def stub(tmp_path):
    """A stand-in interpreter that appends its arguments, one call per line, to a log."""
    log = tmp_path / 'calls.log'
    python = tmp_path / 'python'
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    python.chmod(0o755)
    env = {'PYTHON': str(python), 'CHECKPOINTS_DIR': str(tmp_path / 'ck')}
    return env, log


def test_train_arguments_and_resume(stub, tmp_path):
    env, log = stub
    result, output = run_script('train_celeba.sh', 'orojar', '/data/celeba', '--seed', '3',
                                env=env)
    assert result.returncode == 0, output
    call = log.read_text().splitlines()[-1]
    assert '--reg_lambda 1e-6' in call, call
    assert call.endswith('--seed 3'), call
    assert '--dataroot /data/celeba --name celeba_orojar' in call, call
    assert '--continue_train' not in call

    # A run folder with config.json is resumed; the data path can come from the environment.
    (tmp_path / 'ck' / 'lsun_nog').mkdir(parents=True)
    (tmp_path / 'ck' / 'lsun_nog' / 'config.json').write_text('{}')
    result, output = run_script('train_lsun.sh', 'nog', env={**env, 'LSUN_ROOT': '/data/db'})
    assert result.returncode == 0, output
    call = log.read_text().splitlines()[-1]
    assert '--dataset_mode lsun' in call, call
    assert '--continue_train' in call, call


def test_nproc_per_node_launches_torchrun(stub):
    env, log = stub
    result, output = run_script('train_celeba.sh', 'nog', '/data/celeba',
                                env={**env, 'NPROC_PER_NODE': '4'})
    assert result.returncode == 0, output
    call = log.read_text().splitlines()[-1]
    expected = '-m torch.distributed.run --standalone --nproc_per_node 4 simple_gan/train.py'
    assert call.startswith(expected), call
    result, output = run_script('train_celeba.sh', 'nog', '/data/celeba',
                                env={**env, 'NPROC_PER_NODE': 'two'})
    assert result.returncode == 2, output
    assert "NPROC_PER_NODE must be a positive integer, got 'two'" in output, output


def test_train_scripts_ask_for_sigterm():
    for name in ('train_celeba.sh', 'train_lsun.sh'):
        header = (REPO / 'training_scripts' / name).read_text()
        assert '#SBATCH --signal=B:TERM@' in header, f"{name} has no --signal=B:TERM line"


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_forwarded_exit_zero(tmp_path, signum):
    # SLURM's B: signals reach the batch shell only. A stand-in for torchrun records the
    # SIGTERM it gets and exits 1, as torchrun does after a signal; the script exits 0.
    log, ready = tmp_path / 'calls.log', tmp_path / 'ready'
    python = tmp_path / 'python'
    python.write_text(f'#!/usr/bin/env bash\ntrap \'echo TERM >> "{log}"; exit 1\' TERM\n'
                      f'touch "{ready}"\nwhile true; do sleep 0.05; done\n')
    python.chmod(0o755)
    env = {**os.environ, 'PYTHON': str(python), 'CHECKPOINTS_DIR': str(tmp_path / 'ck'),
           'NPROC_PER_NODE': '2'}
    process = subprocess.Popen(['bash', str(REPO / 'training_scripts' / 'train_celeba.sh'),
                                'nog', '/data/celeba'], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, 'the stand-in launcher did not start in 30 s'
        time.sleep(0.02)
    process.send_signal(signum)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert log.read_text() == 'TERM\n', 'the launcher did not get exactly one SIGTERM'
    assert 'run the same command again to resume' in output, output


def test_train_script_keeps_launcher_failure(tmp_path):
    python = tmp_path / 'python'
    python.write_text('#!/usr/bin/env bash\nexit 3\n')
    python.chmod(0o755)
    result, output = run_script('train_celeba.sh', 'nog', '/data/celeba',
                                env={'PYTHON': str(python), 'CHECKPOINTS_DIR': str(tmp_path)})
    assert result.returncode == 3, output


def test_bad_method_and_missing_data(stub):
    env, _ = stub
    result, output = run_script('train_celeba.sh', 'sgd', '/data', env=env)
    assert result.returncode == 2, output
    assert "unknown method 'sgd'" in output, output
    result, output = run_script('train_celeba.sh', 'nog', env={**env, 'CELEBA_ROOT': ''})
    assert result.returncode == 2, output
    assert 'CELEBA_ROOT' in output, output


def test_spool_copy_finds_repository(stub, tmp_path):
    # sbatch runs a copy of the script from its spool folder; SLURM_SUBMIT_DIR is where
    # sbatch was called, here the repository or its training_scripts/ folder.
    env, log = stub
    spool = tmp_path / 'spool'
    spool.mkdir()
    copy = spool / 'slurm_script'
    copy.write_text((REPO / 'training_scripts' / 'train_celeba.sh').read_text())
    for submit_dir in (REPO, REPO / 'training_scripts'):
        result = subprocess.run(['bash', str(copy), 'nog', '/data/celeba'], cwd=spool,
                                env={**os.environ, **env, 'SLURM_SUBMIT_DIR': str(submit_dir)},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert '--name celeba_nog' in log.read_text().splitlines()[-1]
    result = subprocess.run(['bash', str(copy), 'nog', '/data/celeba'], cwd=spool,
                            env={**os.environ, **env, 'SLURM_SUBMIT_DIR': str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert 'repository not found; set REPO_ROOT' in result.stderr, result.stderr


def test_celeba_end_to_end(tmp_path):
    faces = write_faces(tmp_path / 'faces', n=6)
    env = {'PYTHON': sys.executable, 'CHECKPOINTS_DIR': str(tmp_path / 'ck'), 'DEVICE': 'cpu',
           'IMAGE_SIZE': '64', 'N_PAIRS': '3', 'MODEL_TYPE': 'gan',
           'VISUALIZE_OPTIONS': '--samples 1 --steps 2', 'TORCH_HOME': str(tmp_path / 'th')}
    result, output = run_script('train_celeba.sh', 'nog', str(faces), '--max_steps', '1',
                                *TINY_TRAIN, env=env)
    assert result.returncode == 0, output
    run_dir = tmp_path / 'ck' / 'celeba_nog'
    assert (run_dir / 'latest.pt').is_file()

    result, output = run_script('test_celeba.sh', 'nog', str(faces), '--batch_size', '2',
                                env=env)
    assert result.returncode == 0, output
    assert (run_dir / 'traversals' / 'latest' / 'traversal.gif').is_file()
    assert len(list((run_dir / 'traversals_sefa' / 'latest').glob('dim_*.png'))) == 4
    assert len(list((run_dir / 'vp_pairs' / 'samples').glob('*.png'))) == 3
    assert len(list((tmp_path / 'ck' / 'celeba_real_64').glob('*.png'))) == 6
    assert output.count('FID skipped: Inception weights not found') == 1, output


def test_lsun_dump(tmp_path):
    from simple_gan.lmdb_tool import main as lmdb_tool
    faces = write_faces(tmp_path / 'faces', n=3)
    assert lmdb_tool(['create', str(faces), str(tmp_path / 'db'), '--size', '40']) == 0
    env = {'PYTHON': sys.executable, 'CHECKPOINTS_DIR': str(tmp_path / 'ck'),
           'IMAGE_SIZE': '32', 'LSUN_ROOT': str(tmp_path / 'db')}
    result, output = run_script('dump_lsun.sh', env=env)
    assert result.returncode == 0, output
    assert len(list((tmp_path / 'ck' / 'lsun_real_32').glob('*.png'))) == 3
