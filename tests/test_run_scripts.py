"""run_ffhq.sh and run_animeface.sh: syntax, usage, and a tiny train-then-evaluate run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_images import make_image_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ['run_ffhq.sh', 'run_animeface.sh', 'eigengan/train_and_evaluate.sh']


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_syntax(script):
    result = subprocess.run(['bash', '-n', str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('script', SCRIPTS[:2])
def test_script_usage_without_arguments(script):
    result = subprocess.run(['bash', str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 2, f"exit {result.returncode}"
    assert 'Usage:' in result.stdout, result.stdout


def test_animeface_script_trains_then_evaluates(tmp_path):
    data = tmp_path / 'images'
    data.mkdir()
    make_image_folder(data)
    env = dict(os.environ, PYTHON=sys.executable, LOGDIR=str(tmp_path / 'runs'),
               OMP_NUM_THREADS='1', EVAL_ARGS='--n_pairs 6 --device cpu --n_rows 2 --n_steps 3')
    tiny = ['--size', '32', '--batch', '3', '--n_basis', '3', '--noise_dim', '8',
            '--base_channels', '4', '--max_channels', '8', '--n_workers', '0', '--n_sample', '4',
            '--steps', '2', '--device', 'cpu']
    command = ['bash', str(REPO / 'run_animeface.sh'), str(data), 'tiny', *tiny]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    run = tmp_path / 'runs' / 'tiny'
    assert (run / 'checkpoints' / 'last.pt').is_file(), sorted(p.name for p in run.iterdir())
    eval_dir = run / 'eval'
    labels = sorted(eval_dir.rglob('labels.npy'))
    assert labels, f"no VP pairs under {eval_dir}"
    assert list(eval_dir.rglob('*.png')), f"no images under {eval_dir}"
    # FID and PPL need downloaded weights, which the tests never have: both are skipped.
    assert 'skip' in (result.stdout + result.stderr).lower(), result.stdout[-2000:]
    config = json.loads((run / 'config.json').read_text())
    assert config['family'] == 'eigengan', config['family']

    # The same command again resumes from last.pt, which has reached --steps already.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert 'resuming from' in again.stdout, again.stdout[-2000:]
    assert 'evaluation already in' in again.stdout, again.stdout[-2000:]
