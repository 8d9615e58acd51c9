"""Tests of the VP pairs folder writer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.runs import UserError
from models.vp_pairs import write_vp_pairs


def colour_pairs(batch: int, generator: torch.Generator):
    """Left images pure red, right images pure blue, 4x5 pixels; codes differ in one dim."""
    z1 = torch.rand(batch, 3, generator=generator)
    z2 = z1.clone()
    z2[:, 1] += 1
    red = torch.full((batch, 3, 4, 5), -1.0)
    red[:, 0] = 1
    blue = torch.full((batch, 3, 4, 5), -1.0)
    blue[:, 2] = 1
    return red, blue, {'z1': z1, 'z2': z2}, z1 - z2


def test_layout_and_rgb_order(tmp_path):
    write_vp_pairs(tmp_path / 'pairs', colour_pairs, n_pairs=5, batch_size=2, seed=0)
    names = sorted(p.name for p in (tmp_path / 'pairs').glob('*.png'))
    assert names == [f'{i:06d}.png' for i in range(5)]
    with Image.open(tmp_path / 'pairs' / '000003.png') as img:
        assert img.mode == 'RGB', img.mode
        assert img.size == (10, 4), img.size
        pixels = np.asarray(img)
    assert tuple(pixels[0, 0]) == (255, 0, 0), f"left pixel {pixels[0, 0]} is not red"
    assert tuple(pixels[0, -1]) == (0, 0, 255), f"right pixel {pixels[0, -1]} is not blue"

    labels = np.load(tmp_path / 'pairs' / 'labels.npy')
    codes = np.load(tmp_path / 'pairs' / 'codes.npz')
    assert labels.dtype == np.float32, labels.dtype
    assert labels.shape == (5, 3), labels.shape
    assert np.allclose(labels, codes['z1'] - codes['z2'])
    assert len(list((tmp_path / 'pairs' / 'samples').glob('*.png'))) == 5


def test_same_seed_same_codes(tmp_path):
    write_vp_pairs(tmp_path / 'a', colour_pairs, n_pairs=3, batch_size=3, seed=7)
    write_vp_pairs(tmp_path / 'b', colour_pairs, n_pairs=3, batch_size=1, seed=7,
                   sample_dir=tmp_path / 'left')
    z_a = np.load(tmp_path / 'a' / 'codes.npz')['z1']
    z_b = np.load(tmp_path / 'b' / 'codes.npz')['z1']
    assert np.array_equal(z_a[:1], z_b[:1]), "first code depends on the batch size"
    assert len(list((tmp_path / 'left').glob('*.png'))) == 3


def test_existing_pairs_not_overwritten(tmp_path):
    write_vp_pairs(tmp_path / 'pairs', colour_pairs, n_pairs=2, batch_size=2, seed=0)
    before = (tmp_path / 'pairs' / 'labels.npy').read_bytes()
    with pytest.raises(UserError, match='already contains VP pairs'):
        write_vp_pairs(tmp_path / 'pairs', colour_pairs, n_pairs=2, batch_size=2, seed=1)
    assert (tmp_path / 'pairs' / 'labels.npy').read_bytes() == before
