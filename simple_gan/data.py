"""Datasets of the vanilla GAN: aligned CelebA (image folder) and LSUN (LMDB)."""
from __future__ import annotations

from torch.utils.data import Dataset, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from models.images import ImageFolderDataset
from models.lmdb_data import LMDBImageDataset

DATASET_MODES = ('celeba', 'lsun')
# Aligned CelebA images are 218x178; rows 24:-24 and columns 4:-4 keep the 170x170 face.
CELEBA_ALIGNED_SIZE = (218, 178)
CELEBA_CROP = 170


class CelebACrop:
    """Crop an aligned CelebA image to its central face and resize it, as a PIL transform.

    A 218x178 image keeps rows 24:-24 and columns 4:-4 (170x170). An image of any other size
    gets a centred 170x170 crop, and ``center_crop`` pads smaller images with zeros.
    The crop is then resized to ``size`` with bicubic interpolation.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        if (img.height, img.width) == CELEBA_ALIGNED_SIZE:
            img = img.crop((4, 24, img.width - 4, img.height - 24))  # (left, top, right, bottom)
        else:
            img = TF.center_crop(img, [CELEBA_CROP, CELEBA_CROP])
        return TF.resize(img, [self.size, self.size], interpolation=InterpolationMode.BICUBIC,
                         antialias=True)

    def __repr__(self) -> str:
        return f"CelebACrop(size={self.size})"


def make_dataset(dataset_mode: str, dataroot: str, size: int, max_dataset_size: int | None = None
                 ) -> Dataset:
    """Build the training set: images as tensors (3, size, size) in [-1, 1], unflipped.

    The trainer flips batches itself, with the RNG that its checkpoints save, so that resumed
    runs see the same flips as uninterrupted ones whatever the number of loader workers.
    ``max_dataset_size`` keeps the first that many images.
    """
    if dataset_mode == 'celeba':
        dataset = ImageFolderDataset(dataroot, transform=CelebACrop(size), flip=False)
    elif dataset_mode == 'lsun':
        dataset = LMDBImageDataset(dataroot, size=size, flip=False)
    else:
        raise ValueError(f"unknown dataset mode {dataset_mode!r}; expected one of {DATASET_MODES}")
    if max_dataset_size is not None and max_dataset_size < len(dataset):
        dataset = Subset(dataset, range(max_dataset_size))
    return dataset
