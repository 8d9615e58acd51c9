"""Tests of the Fréchet distance and the offline weight lookup (no weights are downloaded)."""
import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from models import metrics
from models.runs import UserError


def test_frechet_distance_to_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 16))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    d = metrics.frechet_distance(mu, sigma, mu, sigma)
    assert abs(d) < 1e-6, f'distance to itself {d}'


def test_frechet_distance_closed_form():
    # Feature sets drawn from N(m1, A A^T) and N(m2, B B^T); compare with the formula applied to
    # their sample statistics, computed independently here with scipy.
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(2, 8, 8))
    f1 = rng.normal(size=(2000, 8)) @ A.T + 1.0
    f2 = rng.normal(size=(2000, 8)) @ B.T - 0.5
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    expected = (np.sum((mu1 - mu2) ** 2)
                + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2))))
    d = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert abs(d - expected) < 1e-6 * max(1.0, expected), f'{d} vs closed form {expected}'


def test_inception_statistics_with_small_network():
    # A stand-in for Inception with the same output convention: [features (N, C, 1, 1)].
    class Pool(torch.nn.Module):
        def forward(self, x):
            return [x.mean(dim=(2, 3), keepdim=True)]

    batches = [torch.full((3, 3, 4, 4), -1.0), torch.full((3, 3, 4, 4), 1.0)]
    mu, sigma = metrics.inception_statistics(batches, Pool(), 'cpu')
    assert np.allclose(mu, 0.5), f'mean {mu}'  # [-1, 1] mapped to [0, 1]
    assert np.allclose(sigma, 0.3), f'covariance {sigma}'  # six values of 0 or 1: 1.5 / 5


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    with pytest.raises(UserError) as err:
        metrics.load_inception()
    message = str(err.value)
    assert metrics.INCEPTION_FILE in message, message
    assert str(tmp_path / 'hub' / 'checkpoints') in message, message
    assert '--inception_weights' in message, message


def test_missing_weights_path(tmp_path):
    with pytest.raises(UserError, match='file not found'):
        metrics.load_lpips(tmp_path / 'vgg.pth')


def test_weights_found_in_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    (tmp_path / 'checkpoints').mkdir()
    cached = tmp_path / 'checkpoints' / metrics.VGG16_FILE
    cached.write_bytes(b'')
    found = metrics.find_weights(None, metrics.VGG16_FILE, metrics.VGG16_URL, '--x', 'LPIPS')
    assert found == cached


@pytest.mark.parametrize('content', ['damaged', 'other_tensors'])
@pytest.mark.parametrize('loader', ['inception', 'lpips'])
def test_wrong_weights_file_is_clear_error(tmp_path, loader, content):
    path = tmp_path / 'weights.pth'
    if content == 'damaged':
        path.write_bytes(b'not a torch file')
    else:
        torch.save({'fc.weight': torch.zeros(2, 2)}, path)
    load = metrics.load_inception if loader == 'inception' else metrics.load_lpips
    with pytest.raises(UserError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message, message
    assert 'download it again' in message, message
