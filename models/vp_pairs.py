"""Writer for the image pairs of the VP disentanglement score.

The VP score (Zhu et al., "Learning Disentangled Representations with Latent Variation
Predictability", ECCV 2020, arXiv 2007.12885) trains a small classifier to tell which latent
dimension changed between two generated images. Every generator of this repository writes its
pairs through `write_vp_pairs`, so the folder layout is the same for all of them:

    000000.png, 000001.png, ...  one RGB image per pair, twice as wide as high:
                                 left generated from z1, right from z2
    labels.npy                   float32 (n, d), row k = z1 - z2 of pair k
    codes.npz                    every code array returned by the generator (z1, z2, ...),
                                 concatenated over batches, so any pair can be regenerated
    samples/                     the left image of each pair (the default sample folder),
                                 for FID

NOTE: the published implementation wrote RGB arrays with OpenCV, which expects BGR, so its
pair images had red and blue swapped. Here Pillow writes them as RGB.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.runs import UserError

GenerateFn = Callable[[int, torch.Generator], tuple[Tensor, Tensor, dict[str, Tensor], Tensor]]


def to_uint8_images(images: Tensor) -> np.ndarray:
    """Convert a batch (N, C, H, W) in [-1, 1] to uint8 (N, H, W, 3).

    One channel is repeated to three, so grey generators give RGB files too.
    """
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    # A temporary file and os.replace keep a half-written PNG from ever carrying the final name.
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format='PNG')
    os.replace(tmp, path)


def _save_npy_atomic(path: Path, save: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.stem}.', suffix=path.suffix)
    os.close(fd)
    try:
        save(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_empty_target(out_dir: Path, sample_dir: Path) -> None:
    if (out_dir / 'labels.npy').exists() or (out_dir / '000000.png').exists():
        raise UserError(f"{out_dir} already contains VP pairs; choose another output folder "
                        "or move the existing one away (nothing was overwritten)")
    if sample_dir.exists() and any(sample_dir.glob('*.png')):
        raise UserError(f"sample folder {sample_dir} already contains PNG files; choose another "
                        "one (nothing was overwritten)")


@torch.no_grad()
def write_vp_pairs(out_dir, generate: GenerateFn, n_pairs: int, batch_size: int, seed: int,
                   sample_dir=None) -> None:
    """Generate `n_pairs` VP pairs in batches and write them as a VP pairs folder.

    `generate(batch, generator)` returns `(img1, img2, codes, labels)`: two image batches
    (N, C, H, W) in [-1, 1], a dict of code tensors whose first dimension is N (for example
    `z1`, `z2`), and `labels = z1 - z2` of shape (N, d). All randomness must come from
    `generator`, a CPU `torch.Generator` seeded with `seed`, so the same seed gives the same
    pairs on any device. An output folder that already contains pairs raises UserError.
    """
    if n_pairs < 1 or batch_size < 1:
        raise UserError(f"n_pairs and batch_size must be positive (got {n_pairs}, {batch_size})")
    out_dir = Path(out_dir)
    sample_dir = out_dir / 'samples' if sample_dir is None else Path(sample_dir)
    _check_empty_target(out_dir, sample_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample_dir.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator().manual_seed(seed)
    labels, codes = [], {}
    done = 0
    while done < n_pairs:
        n = min(batch_size, n_pairs - done)
        img1, img2, batch_codes, batch_labels = generate(n, generator)
        assert img1.shape == img2.shape, \
            f"generate returned images of shapes {tuple(img1.shape)} and {tuple(img2.shape)}"
        assert img1.shape[0] == n, f"generate returned {img1.shape[0]} pairs, expected {n}"

        # Side by side along the width: (N, C, H, 2W).
        left = to_uint8_images(img1)
        pairs = np.concatenate([left, to_uint8_images(img2)], axis=2)
        for i in range(n):
            _save_png_atomic(pairs[i], out_dir / f"{done + i:06d}.png")
            _save_png_atomic(left[i], sample_dir / f"{done + i:06d}.png")

        labels.append(batch_labels.detach().float().cpu().numpy())
        for key, value in batch_codes.items():
            codes.setdefault(key, []).append(value.detach().float().cpu().numpy())
        done += n

    label_array = np.concatenate(labels).astype(np.float32)  # (n_pairs, d)
    code_arrays = {key: np.concatenate(parts) for key, parts in codes.items()}
    _save_npy_atomic(out_dir / 'codes.npz', lambda p: np.savez(p, **code_arrays))
    _save_npy_atomic(out_dir / 'labels.npy', lambda p: np.save(p, label_array))
