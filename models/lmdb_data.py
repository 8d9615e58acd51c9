"""Image dataset read from an LMDB database, the format in which LSUN is distributed.

Each value of the database is one encoded image (WebP in the LSUN release; PNG or JPEG work
too); keys are arbitrary byte strings. The environment is opened read-only and without the
lock file (``readonly=True, lock=False``), so many processes and read-only file systems can
share one database. It is opened lazily, once in each process that reads items (each
DataLoader worker), because an LMDB environment must not cross a fork. The key list is read
once per dataset object, in memory: no cache file is written anywhere.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from models.images import to_rgb
from models.runs import UserError


def open_lmdb(path: Path, write: bool = False, map_size: int = 1 << 30):
    """Open the LMDB at ``path`` (a folder holding ``data.mdb``, or the data file itself).

    Read-only opening uses ``readonly=True, lock=False, readahead=False``. A path that is
    missing or is not an LMDB database raises ``UserError``.
    """
    import lmdb

    path = Path(path).expanduser()
    subdir = path.is_dir() or (write and not path.exists())
    if not write:
        if not path.exists():
            raise UserError(f"LMDB database {path} not found: pass the folder that contains "
                            f"data.mdb (for LSUN, for example church_outdoor_train_lmdb)")
        if subdir and not (path / 'data.mdb').is_file():
            raise UserError(f"{path} is not an LMDB database: data.mdb not found in it; "
                            f"build one from an image folder with "
                            f"'python simple_gan/lmdb_tool.py create FOLDER OUT_LMDB'")
    try:
        if write:
            return lmdb.open(str(path), subdir=subdir, map_size=map_size, readahead=False,
                             meminit=False)
        return lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False,
                         meminit=False, max_readers=512)
    except lmdb.Error as err:
        raise UserError(f"{path} is not a readable LMDB database ({err})") from None


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes into an 8-bit RGB Pillow image; ``where`` names the entry."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{where} is not a decodable image ({err})") from None


class LMDBImageDataset(Dataset):
    """All images of an LMDB database, as float tensors ``(3, size, size)`` in ``[-1, 1]``.

    Args:
        path: LMDB folder (holding ``data.mdb``) or data file.
        transform: maps an RGB PIL image to a PIL image. When None, ``Resize(size)`` of the
            shorter side (bicubic, antialiased) and ``CenterCrop(size)`` are used.
        size: output side in pixels for the default transform.
        flip: random horizontal flip with probability 0.5 after the transform.

    Keys are listed once, in the database's sorted order, when the dataset is built. A path
    that is not an LMDB database, or one without entries, raises ``UserError``. An entry that
    does not decode raises ``UserError`` naming its key when it is read.
    """

    def __init__(self, path, transform: Callable | None = None, size: int | None = 128,
                 flip: bool = True):
        self.path = Path(path).expanduser()
        env = open_lmdb(self.path)
        try:
            with env.begin(write=False) as txn:
                self.keys = [bytes(key) for key in txn.cursor().iternext(keys=True, values=False)]
        finally:
            env.close()
        if not self.keys:
            raise UserError(f"LMDB database {self.path} has no entries")
        if transform is None and size is not None:
            transform = transforms.Compose([
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC,
                                  antialias=True),
                transforms.CenterCrop(size),
            ])
        self.transform = transform
        self.flip = flip
        self._env = None
        self._env_pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        # DataLoader workers receive a copy without the open environment and open their own.
        state = self.__dict__.copy()
        state['_env'] = None
        state['_env_pid'] = None
        return state

    def _txn_get(self, key: bytes) -> bytes:
        if self._env is None or self._env_pid != os.getpid():
            self._env = open_lmdb(self.path)
            self._env_pid = os.getpid()
        with self._env.begin(write=False, buffers=False) as txn:
            data = txn.get(key)
        if data is None:
            raise UserError(f"{self.path}: key {key!r} disappeared from the database")
        return data

    def load_rgb(self, index: int) -> Image.Image:
        """Decode the entry at ``index`` into an RGB Pillow image."""
        key = self.keys[index]
        return decode_image(self._txn_get(key), f"{self.path} entry {key!r}")

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self.load_rgb(index)
        if self.transform is not None:
            img = self.transform(img)
        if self.flip and torch.rand(()) < 0.5:
            img = TF.hflip(img)
        return TF.to_tensor(img) * 2.0 - 1.0  # (3, H, W) in [-1, 1]
