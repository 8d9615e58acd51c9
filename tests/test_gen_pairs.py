"""Tests of gen_pairs.py: every pair differs in exactly the dimension its label names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_pairs
from models.runs import UserError, save_checkpoint
from simple_gan.networks import IMAGE_SIZES, build_networks, sefa_rotated


def vanilla_checkpoint(path, model: str, nz: int = 5):
    torch.manual_seed(0)
    G, _ = build_networks(model, nz, 3, width_mult=1 / 64)
    config = {'model': model, 'nz': nz, 'nc_out': 3, 'width_mult': 1 / 64}
    save_checkpoint(path, {'G': G.state_dict(), 'model_config': config})
    return G.eval()


def eigengan_checkpoint(path):
    from eigengan.model import Generator
    from models.gan import make_ema
    torch.manual_seed(0)
    G = Generator(size=16, n_basis=2, noise_dim=8, base_channels=4, max_channels=8)
    G_ema = make_ema(G, 0.9)
    save_checkpoint(path, {'arch': G.arch(), 'G': G.state_dict(), 'G_ema': G_ema.state_dict()})
    return G.eval()


def read_pairs(folder, n):
    images = []
    for i in range(n):
        with Image.open(folder / f'{i:06d}.png') as img:
            images.append(np.asarray(img.convert('RGB'), dtype=np.float32) / 127.5 - 1)
    return np.stack(images)  # (n, H, 2W, 3) in [-1, 1]


def check_one_dimension(folder, n):
    labels = np.load(folder / 'labels.npy')
    codes = np.load(folder / 'codes.npz')
    assert labels.dtype == np.float32, labels.dtype
    assert labels.shape[0] == n, labels.shape
    assert np.array_equal(labels, (codes['z1'] - codes['z2']).astype(np.float32))
    changed = (labels != 0).sum(axis=1)
    assert np.all(changed == 1), f"non-zero label entries per pair: {changed}"
    return codes


def as_hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('model', ['gan', 'gan128'])
@pytest.mark.parametrize('sefa', [False, True])
def test_vanilla_pairs(model, sefa, tmp_path):
    G = vanilla_checkpoint(tmp_path / 'G.pt', model)
    argv = ['--model_type', model, '--model_path', str(tmp_path / 'G.pt'), '--n_pairs', '5',
            '--batch_size', '2', '--save_dir', str(tmp_path / 'pairs'), '--device', 'cpu']
    assert gen_pairs.main(argv + (['--sefa'] if sefa else [])) == 0
    codes = check_one_dimension(tmp_path / 'pairs', 5)
    assert np.abs(codes['z1']).max() <= 2, "codes outside [-2, 2]"

    # Each half of a pair image is the generator's image of its code (8-bit rounding).
    if sefa:
        G, _ = sefa_rotated(G)
    with torch.no_grad():
        left = as_hwc(G(torch.from_numpy(codes['z1'])))
        right = as_hwc(G(torch.from_numpy(codes['z2'])))
    pairs = read_pairs(tmp_path / 'pairs', 5)
    size = IMAGE_SIZES[model]
    assert pairs.shape == (5, size, 2 * size, 3)
    error = max(np.abs(pairs[:, :, :size] - left).max(), np.abs(pairs[:, :, size:] - right).max())
    assert error <= 1.01 / 127.5, f"pair images differ from G(z) by {error}"


def test_eigengan_pairs(tmp_path):
    pytest.importorskip('eigengan.evaluate')
    from eigengan.evaluate import load_generator, regenerate_pairs
    eigengan_checkpoint(tmp_path / 'G.pt')
    argv = ['--model_type', 'eigengan', '--model_path', str(tmp_path / 'G.pt'), '--n_pairs',
            '4', '--batch_size', '3', '--save_dir', str(tmp_path / 'pairs'), '--device', 'cpu']
    assert gen_pairs.main(argv) == 0
    codes = check_one_dimension(tmp_path / 'pairs', 4)
    assert codes['z1'].shape == (4, 2 * 2), f"codes {codes['z1'].shape} (2 blocks x 2 bases)"
    assert np.abs(codes['z1']).max() <= 4
    G = load_generator(tmp_path / 'G.pt', 'cpu')
    left, _ = regenerate_pairs(G, codes['z1'], codes['z2'], codes['noise'], 'cpu')
    error = np.abs(read_pairs(tmp_path / 'pairs', 4)[:, :, :16] - as_hwc(left)).max()
    assert error <= 1.01 / 127.5, f"left images differ from G(z1) by {error}"


def test_wrong_model_type_is_user_error(tmp_path):
    vanilla_checkpoint(tmp_path / 'G.pt', 'gan')
    argv = ['--model_type', 'gan128', '--model_path', str(tmp_path / 'G.pt'), '--n_pairs', '1',
            '--save_dir', str(tmp_path / 'pairs'), '--device', 'cpu']
    with pytest.raises(UserError, match='model=gan'):
        gen_pairs.main(argv)
    assert not (tmp_path / 'pairs').exists()
