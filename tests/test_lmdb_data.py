"""Tests of the LMDB image dataset and of simple_gan/lmdb_tool.py."""
from __future__ import annotations

import os

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from models.lmdb_data import LMDBImageDataset
from models.runs import UserError
from simple_gan.lmdb_tool import main as lmdb_tool


def write_images(folder, n=6, size=(40, 56)):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = []
    for i in range(n):
        array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f'{i:02d}.png')
        arrays.append(array)
    return arrays


def test_round_trip_with_two_workers(tmp_path, monkeypatch):
    arrays = write_images(tmp_path / 'images')
    assert lmdb_tool(['create', str(tmp_path / 'images'), str(tmp_path / 'db')]) == 0
    caller = tmp_path / 'caller'
    caller.mkdir()
    monkeypatch.chdir(caller)

    # No transform: the PNG bytes were stored unchanged, so the pixels come back exactly.
    dataset = LMDBImageDataset(tmp_path / 'db', size=None, flip=False)
    assert len(dataset) == 6
    batches = list(DataLoader(dataset, batch_size=3, num_workers=2))
    images = torch.cat(batches)  # (6, 3, 40, 56) in [-1, 1]
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, array in enumerate(arrays):
        assert np.array_equal(pixels[i], array), f"image {i} differs after the LMDB round trip"
    assert list(caller.iterdir()) == [], "a file was written next to the caller"
    assert sorted(p.name for p in (tmp_path / 'db').iterdir()) == ['data.mdb', 'lock.mdb']


def test_default_transform_size(tmp_path):
    write_images(tmp_path / 'images')
    lmdb_tool(['create', str(tmp_path / 'images'), str(tmp_path / 'db')])
    x = LMDBImageDataset(tmp_path / 'db', size=32)[0]
    assert x.shape == (3, 32, 32), f"shape {tuple(x.shape)}"
    assert float(x.min()) >= -1, float(x.min())
    assert float(x.max()) <= 1, float(x.max())


def test_not_an_lmdb_is_user_error(tmp_path):
    (tmp_path / 'folder').mkdir()
    with pytest.raises(UserError, match='not an LMDB'):
        LMDBImageDataset(tmp_path / 'folder')
    (tmp_path / 'file.txt').write_text('hello')
    with pytest.raises(UserError, match='not a readable LMDB'):
        LMDBImageDataset(tmp_path / 'file.txt')
    with pytest.raises(UserError, match='not found'):
        LMDBImageDataset(tmp_path / 'missing')


def test_empty_lmdb_is_user_error(tmp_path):
    lmdb.open(str(tmp_path / 'empty'), map_size=1 << 20).close()
    with pytest.raises(UserError, match='no entries'):
        LMDBImageDataset(tmp_path / 'empty')


def test_undecodable_entry_names_key(tmp_path):
    env = lmdb.open(str(tmp_path / 'db'), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b'broken', b'not an image')
    env.close()
    with pytest.raises(UserError, match='broken'):
        LMDBImageDataset(tmp_path / 'db')[0]


def test_tool_refuses_to_overwrite(tmp_path):
    write_images(tmp_path / 'images')
    lmdb_tool(['create', str(tmp_path / 'images'), str(tmp_path / 'db')])
    before = os.path.getmtime(tmp_path / 'db' / 'data.mdb')
    with pytest.raises(UserError, match='already exists'):
        lmdb_tool(['create', str(tmp_path / 'images'), str(tmp_path / 'db')])
    assert os.path.getmtime(tmp_path / 'db' / 'data.mdb') == before

    assert lmdb_tool(['dump', str(tmp_path / 'db'), str(tmp_path / 'out'), '--size', '16']) == 0
    files = sorted((tmp_path / 'out').glob('*.png'))
    assert len(files) == 6
    with Image.open(files[0]) as img:
        assert img.size == (16, 16), img.size
        assert img.mode == 'RGB', img.mode
    with pytest.raises(UserError, match='already contains PNG'):
        lmdb_tool(['dump', str(tmp_path / 'db'), str(tmp_path / 'out')])
