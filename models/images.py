"""Image-folder dataset shared by the EigenGAN and vanilla GAN trainers.

Every file is read, never written: the published EigenGAN trainer deleted 0-byte images from the
dataset folder, and this one skips them instead.

Broken files are found in two stages, so that a folder of 70,000 large images does not have to
be decoded at start-up:

1. At construction each file gets a cheap check. It must be non-empty, and Pillow must identify
   its format from the header, which reads a few bytes and no pixels. A JPEG must also contain
   its end-of-image marker ``FF D9``, and a PNG its ``IEND`` chunk, within its last 1 KiB.
   A file cut short by an interrupted copy fails this last check. Files that fail are skipped,
   and one warning gives their count and a few names.
   NOTE: a complete JPEG followed by more than 1 KiB of appended data also fails and is skipped.
2. Damage that the header check cannot see (a truncated TIFF or WebP, a JPEG whose data Pillow
   cannot decode) raises when the pixels are decoded. ``__getitem__`` then substitutes the next
   readable image, so a batch keeps its size. The first such failure in a process warns, and
   every failure is recorded in ``dataset.decode_failures``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from models.runs import UserError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    '.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pbm',
    '.pnm',
)
TAIL_BYTES = 1024
SHOWN_NAMES = 5


def _tail_is_complete(path: Path, image_format: str | None) -> bool:
    """Return False when a JPEG or PNG lacks its closing marker (a truncated file)."""
    marker = {'JPEG': b'\xff\xd9', 'PNG': b'IEND'}.get(image_format or '')
    if marker is None:
        return True
    with open(path, 'rb') as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        return marker in f.read()


def check_image_file(path: Path) -> str | None:
    """Run the cheap start-up check on one file; return the reason it fails, or None."""
    try:
        if path.stat().st_size == 0:
            return 'empty file'
        with Image.open(path) as img:
            image_format = img.format
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return f'not a readable image ({type(err).__name__})'
    if not _tail_is_complete(path, image_format):
        return f'truncated {image_format}'
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Grayscale, palette, alpha and CMYK modes go through ``Image.convert``. Integer grayscale
    modes ``I;16*`` and ``I`` (which Pillow uses for 16-bit PNGs) are divided by 65535/255, and
    float ``F`` images by their range, because ``convert`` would clip the values at 255 and
    return a nearly white image. Alpha is dropped, not composited.
    """
    if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
        array = np.asarray(img, dtype=np.float64)
        if img.mode == 'F':
            # Float images hold either [0, 1] or arbitrary positive values.
            full_scale = 1.0 if array.max() <= 1.0 else float(array.max())
        else:
            full_scale = 65535.0
        array = np.clip(array / full_scale * 255.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(array)
    if img.mode == 'P':
        # A palette may carry transparency; going through RGBA avoids Pillow's warning.
        img = img.convert('RGBA')
    return img.convert('RGB')


def _warn_skipped(root: Path, bad: list[tuple[Path, str]], total: int) -> None:
    shown = ', '.join(f'{p.relative_to(root)} ({why})' for p, why in bad[:SHOWN_NAMES])
    more = f' and {len(bad) - SHOWN_NAMES} more' if len(bad) > SHOWN_NAMES else ''
    warnings.warn(f'{root}: skipped {len(bad)} of {total} image files that cannot be read: '
                  f'{shown}{more}. The files were left unchanged.', stacklevel=3)


class ImageFolderDataset(Dataset):
    """All images under ``root`` (recursive), as float tensors ``(3, H, W)`` in ``[-1, 1]``.

    Args:
        root: folder searched recursively for files whose suffix is in ``IMAGE_EXTENSIONS``
            (case-insensitive), in sorted path order.
        transform: maps an RGB PIL image to a PIL image (for example a crop and a resize). When
            None, ``Resize(size)`` (shorter side, antialiased) and ``CenterCrop(size)`` are used,
            or no resizing at all if ``size`` is None as well.
        size: output side in pixels for the default transform.
        flip: random horizontal flip with probability 0.5 after the transform.

    Raises ``UserError`` when ``root`` is missing or contains no readable image. Unreadable, empty
    and truncated files are skipped with one warning (see the module docstring for how they
    are detected).
    """

    def __init__(self, root, transform: Callable | None = None, size: int | None = None,
                 flip: bool = True):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserError(f'image folder {self.root} not found: pass the folder that contains '
                            f'the training images (searched recursively)')
        candidates = sorted(p for p in self.root.rglob('*')
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        bad = [(p, why) for p in candidates if (why := check_image_file(p)) is not None]
        bad_set = {p for p, _ in bad}
        self.paths = [p for p in candidates if p not in bad_set]
        if bad:
            _warn_skipped(self.root, bad, len(candidates))
        if not self.paths:
            raise UserError(f'no readable images in {self.root} (found {len(candidates)} files '
                            f'with suffixes {", ".join(IMAGE_EXTENSIONS)}, {len(bad)} unreadable)')
        if transform is None and size is not None:
            transform = transforms.Compose([
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC,
                                  antialias=True),
                transforms.CenterCrop(size),
            ])
        self.transform = transform
        self.flip = flip
        self.decode_failures: list[Path] = []

    def __len__(self) -> int:
        return len(self.paths)

    def load_rgb(self, index: int) -> Image.Image:
        """Decode the image at ``index`` fully and convert it to RGB (may raise OSError)."""
        with Image.open(self.paths[index]) as img:
            img.load()
            return to_rgb(img)

    def _load_or_substitute(self, index: int) -> Image.Image:
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            try:
                return self.load_rgb(i)
            except (OSError, SyntaxError, ValueError):
                self.decode_failures.append(self.paths[i])
                if len(self.decode_failures) == 1:
                    warnings.warn(f'{self.paths[i]} failed to decode, so the next image is used '
                                  f'in its place. Later failures are counted in '
                                  f'dataset.decode_failures without another warning.')
        raise UserError(f'none of the {len(self.paths)} images in {self.root} could be decoded')

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self._load_or_substitute(index)
        if self.transform is not None:
            img = self.transform(img)
        if self.flip and torch.rand(()) < 0.5:
            img = TF.hflip(img)
        x = TF.to_tensor(img)  # (3, H, W) in [0, 1]
        return x * 2.0 - 1.0
