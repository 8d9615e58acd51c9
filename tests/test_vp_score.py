"""Tests of vp_score.py on small synthetic VP pairs folders written into tmp_path."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vp_score
from models.runs import UserError

pytestmark = pytest.mark.usefixtures('one_thread')

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # pixels per half image


def render_stripes(z: np.ndarray) -> np.ndarray:
    """Render codes (n, d) as grey images (n, SIZE, SIZE, 3): dimension i sets stripe i."""
    n, d = z.shape
    rows = np.repeat(np.arange(d), SIZE // d)  # stripe index of each image row
    values = np.clip(128 + 40 * z[:, rows], 0, 255)  # (n, SIZE)
    return np.repeat(values[:, :, None, None], SIZE, axis=2).repeat(3, axis=3).astype(np.uint8)


def make_codes(n: int, d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw z1 ~ U[-1.5, 1.5]^d and z2 = z1 with dimension k % d moved by +-(0.6 to 1.2)."""
    z1 = rng.uniform(-1.5, 1.5, size=(n, d)).astype(np.float32)
    z2 = z1.copy()
    change = rng.uniform(0.6, 1.2, size=n) * rng.choice([-1, 1], size=n)
    dims = np.arange(n) % d
    z2[np.arange(n), dims] += change
    return z1, z2


def write_pairs(folder: Path, left: np.ndarray, right: np.ndarray, labels: np.ndarray) -> Path:
    """Write a VP pairs folder: side-by-side PNGs, labels.npy and codes.npz."""
    folder.mkdir(parents=True)
    for k, (a, b) in enumerate(zip(left, right)):
        Image.fromarray(np.concatenate([a, b], axis=1)).save(folder / f'{k:06d}.png')
    np.save(folder / 'labels.npy', labels.astype(np.float32))
    np.savez(folder / 'codes.npz', labels=labels)
    return folder


def stripe_pairs(folder: Path, n: int, d: int = 4, seed: int = 0) -> Path:
    z1, z2 = make_codes(n, d, np.random.default_rng(seed))
    return write_pairs(folder, render_stripes(z1), render_stripes(z2), z1 - z2)


# 96 training pairs, 60 steps: enough for the batch norm running averages to settle.
FAST = ['--epochs', '10', '--eval_every', '10', '--test_ratio', '0.5', '--batch_size', '16',
        '--seeds', '0', '--device', 'cpu', '--workers', '0']


def train_and_predict(folder: Path, rule: str) -> tuple[dict, np.ndarray, torch.Tensor]:
    """Train one classifier with FAST settings; return its result, the labels, its predictions."""
    args = vp_score.parse_args([str(folder), *FAST, '--label_rule', rule])
    pairs, labels = vp_score.load_pairs(folder)
    targets = vp_score.targets_from_labels(labels, rule)
    result = vp_score.train_run(pairs, targets, labels.shape[1], 0, args, torch.device('cpu'))
    return result, labels, vp_score.predict(result['model'], pairs, 'diff')


def test_targets_abs_and_signed():
    labels = np.array([[0.0, -0.7, 0.0],   # negative change of dimension 1
                       [0.0, 0.0, 0.9],    # positive change of dimension 2
                       [-0.5, 0.0, 0.0]],  # negative change of dimension 0
                      dtype=np.float32)
    abs_targets = vp_score.targets_from_labels(labels, 'abs')
    signed_targets = vp_score.targets_from_labels(labels, 'signed')
    assert abs_targets.tolist() == [1, 2, 0], f"abs targets {abs_targets}"
    # argmax (z1 - z2) lands on the first zero entry when the change is negative
    assert signed_targets.tolist() == [0, 2, 1], f"signed targets {signed_targets}"


def test_disentangled_pairs_score_high(tmp_path):
    folder = stripe_pairs(tmp_path / 'pairs', n=192)
    result, labels, predicted = train_and_predict(folder, 'abs')
    assert result['n_test'] == 96, f"n_test {result['n_test']}"
    assert result['best'] >= 95.0, f"VP score {result['best']:.1f}% on stripe pairs"
    # Half of the changes are negative, and 'abs' must classify those as well.
    negative = torch.from_numpy(labels.sum(1) < 0)
    true_dims = torch.from_numpy(np.abs(labels).argmax(1))
    hits = (predicted == true_dims)[negative].float().mean().item()
    assert hits >= 0.95, f"{100 * hits:.1f}% of the negative changes classified correctly"


def test_code_independent_pairs_at_chance(tmp_path):
    n, d = 192, 4
    rng = np.random.default_rng(1)
    z1, z2 = make_codes(n, d, rng)
    # Both images are noise drawn without looking at the codes.
    noise = rng.integers(0, 256, size=(2, n, SIZE, SIZE, 3), dtype=np.uint8)
    folder = write_pairs(tmp_path / 'pairs', noise[0], noise[1], z1 - z2)
    result, _, _ = train_and_predict(folder, 'abs')
    chance = 1 / d
    std = 100 * math.sqrt(chance * (1 - chance) / result['n_test'])
    assert abs(result['final'] - 100 * chance) <= 3 * std, (
        f"final accuracy {result['final']:.1f}% vs chance {100 * chance:.0f}% "
        f"(3 std = {3 * std:.1f} points)")


def test_signed_rule_learns_wrong_classes(tmp_path):
    folder = stripe_pairs(tmp_path / 'pairs', n=192)
    result, labels, predicted = train_and_predict(folder, 'signed')
    true_dims = torch.from_numpy(np.abs(labels).argmax(1))
    negative = torch.from_numpy(labels.sum(1) < 0)
    hits_negative = (predicted == true_dims)[negative].float().mean().item()
    hits_positive = (predicted == true_dims)[~negative].float().mean().item()
    # The classifier fits the signed classes, so it names the changed dimension of a positive
    # change and the first zero entry of a negative one (right only by accident).
    assert result['best'] >= 90.0, f"score against the signed classes {result['best']:.1f}%"
    assert hits_positive >= 0.95, f"positive changes: {100 * hits_positive:.1f}% right"
    assert hits_negative <= 0.3, f"negative changes: {100 * hits_negative:.1f}% right"


def test_run_dir_metrics_merged(tmp_path):
    folder = stripe_pairs(tmp_path / 'pairs', n=64)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'metrics.json').write_text(json.dumps({'fid': {'value': 12.5, 'settings': {}}}))
    out = tmp_path / 'vp.json'
    code = vp_score.main([str(folder), '--epochs', '1', '--test_ratio', '0.5', '--seeds', '0',
                          '1', '--device', 'cpu', '--workers', '2', '--run_dir', str(run_dir),
                          '--out', str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [run['seed'] for run in report['runs']] == [0, 1], f"runs {report['runs']}"
    assert report['n_pairs'] == 64, f"n_pairs {report['n_pairs']}"
    assert report['versions']['torch'] == torch.__version__
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    assert set(metrics) == {'fid', 'vp_mean', 'vp_std'}, f"keys {sorted(metrics)}"
    assert metrics['vp_mean']['settings']['seeds'] == [0, 1]
    assert metrics['vp_mean']['value'] == pytest.approx(report['vp_mean']), metrics['vp_mean']


def break_missing_labels(folder: Path) -> None:
    (folder / 'labels.npy').unlink()


def break_count(folder: Path) -> None:
    labels = np.load(folder / 'labels.npy')
    np.save(folder / 'labels.npy', np.concatenate([labels, labels[:1]]))


def break_two_dims(folder: Path) -> None:
    labels = np.load(folder / 'labels.npy')
    labels[0, 1] = 0.5  # row 0 already changes dimension 0
    np.save(folder / 'labels.npy', labels)


def break_aspect(folder: Path) -> None:
    Image.new('RGB', (SIZE, SIZE)).save(folder / '000002.png')


@pytest.mark.parametrize('damage, message', [
    (break_missing_labels, 'labels.npy not found'),
    (break_count, 'has 8 pair images but labels.npy has 9 rows'),
    (break_two_dims, 'row 0 changes 2'),
    (break_aspect, 'twice as wide as high'),
])
def test_invalid_folder_errors(tmp_path, damage, message):
    folder = stripe_pairs(tmp_path / 'pairs', n=8)
    damage(folder)
    with pytest.raises(UserError, match=message):
        vp_score.main([str(folder), '--device', 'cpu'])


def test_missing_folder_error(tmp_path):
    with pytest.raises(UserError, match='not found'):
        vp_score.main([str(tmp_path / 'absent'), '--device', 'cpu'])


def test_command_line_error_exit_code(tmp_path):
    folder = stripe_pairs(tmp_path / 'pairs', n=8)
    break_missing_labels(folder)
    proc = subprocess.run([sys.executable, str(ROOT / 'vp_score.py'), str(folder),
                           '--device', 'cpu'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, f"exit code {proc.returncode}, stderr {proc.stderr!r}"
    assert proc.stderr.startswith('error: '), proc.stderr
    assert 'labels.npy not found' in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
