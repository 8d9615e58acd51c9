"""Image classification data for the decorrelated batch norm experiments.

Song, Sebe and Wang (arXiv 2207.02119) train CIFAR ResNets whose stem is followed by ZCA
whitening. This module reads CIFAR-100 and CIFAR-10 from the official "python version"
pickle folders and offers scikit-learn's 8x8 digits as a small data set that needs no
download:

    root/cifar-100-python/{train, test, meta}
    root/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch, batches.meta}

torchvision only downloads and verifies the official archive: the URL, archive name, MD5
sums and file lists are read from ``torchvision.datasets.CIFAR100`` and ``CIFAR10``.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from models.runs import UserError

DATASETS = ('cifar100', 'cifar10', 'digits')
NUM_CLASSES = {'cifar100': 100, 'cifar10': 10, 'digits': 10}
DISPLAY_NAMES = {'cifar100': 'CIFAR-100', 'cifar10': 'CIFAR-10', 'digits': 'digits'}

# Per-channel mean and standard deviation of the training images scaled to [0, 1]. CIFAR: the
# widely used values over all pixels of the 50,000 training images (not re-measured here).
# Digits: measured over the 1,437 training images of DigitsDataset(train=True, split_seed=0)
# after the 32x32 upsampling. Its three channels are copies of one grey channel.
MEAN_STD = {
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'digits': ((0.3054, 0.3054, 0.3054), (0.3237, 0.3237, 0.3237)),
}

_TORCHVISION_CLASSES = {'cifar100': CIFAR100, 'cifar10': CIFAR10}

# The only globals a CIFAR pickle needs: NumPy arrays (written by NumPy 1 or 2), and the
# bytes encoder that Python 3 uses for bytes in pickle protocols below 3.
_ALLOWED_GLOBALS = {
    ('_codecs', 'encode'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
    ('copyreg', '_reconstructor'), ('builtins', 'object'),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that loads NumPy arrays and plain containers and rejects any other global.

    A pickle can run arbitrary code when loaded, and data folders are often shared.
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def cifar_files(name: str) -> tuple[str, list[str], list[str], str]:
    """Return the folder name, training files, test files and meta file of a CIFAR data set."""
    cls = _TORCHVISION_CLASSES[name]
    return (cls.base_folder, [f for f, _ in cls.train_list], [f for f, _ in cls.test_list],
            cls.meta['filename'])


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, 'rb') as file:
            content = _ArrayUnpickler(file, encoding='bytes').load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is corrupted or not a CIFAR pickle ({err}). Replace the "
                        f"folder with a fresh copy of the official archive") from err
    if not isinstance(content, dict):
        raise UserError(f"{path} contains a {type(content).__name__}, not a CIFAR batch dict")
    # Python 2 pickles read with encoding='bytes' have bytes keys; make them str.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


class CIFARPickleDataset(Dataset):
    """CIFAR-100 or CIFAR-10 read from the official python pickle folder under ``root``.

    Each batch file is a dict with ``data``, a uint8 array (N, 3072) with the red, green and
    blue 32x32 planes of each image, and ``fine_labels`` (CIFAR-100) or ``labels``
    (CIFAR-10). Items are ``(image, label)`` with ``image`` a 32x32 RGB ``PIL.Image`` passed
    through ``transform`` when given, and ``label`` an int. ``classes`` lists the class names
    from the meta file.
    """

    def __init__(self, root: str | Path, name: str, train: bool,
                 transform: Callable | None = None):
        if name not in _TORCHVISION_CLASSES:
            raise ValueError(f"name must be 'cifar100' or 'cifar10', not {name!r}")
        folder_name, train_files, test_files, meta_file = cifar_files(name)
        folder = Path(root) / folder_name
        label_key = 'fine_labels' if name == 'cifar100' else 'labels'
        self.transform = transform

        images, labels = [], []
        for file_name in train_files if train else test_files:
            batch = _read_pickle(folder / file_name)
            data = np.asarray(batch.get('data'))
            targets = batch.get(label_key)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise UserError(f"{folder / file_name}: 'data' is {data.dtype} of shape "
                                f"{data.shape}, expected uint8 of shape (N, 3072)")
            if targets is None or len(targets) != len(data):
                raise UserError(f"{folder / file_name}: expected {len(data)} '{label_key}', "
                                f"found {None if targets is None else len(targets)}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
            labels.extend(int(t) for t in targets)
        self.data = np.ascontiguousarray(np.concatenate(images))
        self.targets = labels

        meta = _read_pickle(folder / meta_file)
        names_key = 'fine_label_names' if name == 'cifar100' else 'label_names'
        self.classes = [n.decode() if isinstance(n, bytes) else str(n)
                        for n in meta.get(names_key, [])]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits as 32x32 RGB images, with a fixed split.

    The 8x8 images (values 0 to 16) are scaled to 0 to 255, upsampled bilinearly to 32x32
    and copied to three channels, so that a CIFAR network runs on them unchanged. The split
    is stratified by class, 80% training (1,437 images) and 20% test (360), and depends only
    on ``split_seed``, never on the training seed. Items are ``(PIL RGB image, int label)``.
    """

    def __init__(self, train: bool, transform: Callable | None = None, split_seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_idx, test_idx = train_test_split(indices, test_size=0.2, stratify=digits.target,
                                               random_state=split_seed)
        self.indices = np.sort(train_idx if train else test_idx)

        images = torch.from_numpy(digits.images[self.indices] * (255.0 / 16.0))
        images = F.interpolate(images[:, None], size=(32, 32), mode='bilinear',
                               align_corners=False)[:, 0]  # (N, 32, 32)
        self.data = images.round().clamp(0, 255).to(torch.uint8).numpy()
        self.targets = [int(t) for t in digits.target[self.indices]]
        self.classes = [str(d) for d in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index]).convert('RGB')
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


# Runs in a child process so that the whole download can be stopped at the time limit.
_DOWNLOAD_SCRIPT = """
import socket, sys
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
url, root, filename, md5, timeout = sys.argv[1:6]
socket.setdefaulttimeout(float(timeout))
try:
    download_and_extract_archive(url, download_root=root, filename=filename, md5=md5)
except Exception as err:
    sys.exit(f'{type(err).__name__}: {err}')
for path, file_md5 in zip(sys.argv[6::2], sys.argv[7::2]):
    if not check_integrity(path, file_md5):
        sys.exit(f'{path} does not match its MD5 sum after extraction')
"""


def _download_cifar(name: str, root: Path, timeout: float) -> str | None:
    """Download and extract the official archive into ``root``, returning an error or None."""
    cls = _TORCHVISION_CLASSES[name]
    folder = root / cls.base_folder
    checks = []
    for file_name, md5 in [*cls.train_list, *cls.test_list,
                           (cls.meta['filename'], cls.meta['md5'])]:
        checks += [str(folder / file_name), md5]
    # Each socket operation may block for at most a quarter of the time limit.
    command = [sys.executable, '-c', _DOWNLOAD_SCRIPT, cls.url, str(root), cls.filename,
               cls.tgz_md5, str(max(timeout / 4, 1.0)), *checks]
    print(f"downloading {cls.url} into {root} (time limit {timeout:g} s)", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:g} s"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {result.returncode}"
    return None


def _missing_cifar_message(name: str, root: Path, missing: list[str],
                           reason: str | None) -> str:
    """Describe missing CIFAR files and why a download failed (``reason``, None if not tried)."""
    cls = _TORCHVISION_CLASSES[name]
    folder = root / cls.base_folder
    _, train_files, test_files, meta_file = cifar_files(name)
    expected = [*train_files, *test_files, meta_file]
    if reason is None:
        first = f"{DISPLAY_NAMES[name]} not found and downloading is off (--no_download)"
    else:
        first = f"downloading {DISPLAY_NAMES[name]} failed ({reason})"
    if not missing:
        problem = "contains files that do not match their MD5 sums"
    elif len(missing) < len(expected):
        problem = f"is missing {', '.join(missing)} (expected {', '.join(expected)})"
    else:
        problem = f"is missing {', '.join(missing)}"
    hint = "" if reason is None else " (and --no_download to skip this download attempt)"
    return (f"{first}: {folder} {problem}. Download {cls.url} (MD5 {cls.tgz_md5}) on a "
            f"machine with internet access and extract it into {root}, or pass --data_root "
            f"with the folder that contains {cls.base_folder}/{hint}")


def load_datasets(name: str, root: str | Path, download: bool = True,
                  train_transform: Callable | None = None,
                  test_transform: Callable | None = None,
                  download_timeout: float = 120.0) -> tuple[Dataset, Dataset]:
    """Return the training and test sets of ``name`` (one of ``DATASETS``).

    For CIFAR, a missing or incomplete pickle folder under ``root`` is downloaded into
    ``root`` with torchvision, which verifies the archive's MD5 sum, when ``download`` is
    True. The download is stopped after ``download_timeout`` seconds. A failed download, or
    ``download=False``, raises ``UserError`` naming the folder, the missing files and how to
    get them. Digits ignore ``root`` and ``download``.

    NOTE: concurrent downloads into one ``root`` (several torchrun ranks) would overwrite each
    other's files, so a distributed trainer calls this on one rank before the others.
    """
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    if name == 'digits':
        return (DigitsDataset(train=True, transform=train_transform),
                DigitsDataset(train=False, transform=test_transform))

    root = Path(root).expanduser()
    folder_name, train_files, test_files, meta_file = cifar_files(name)
    expected = [*train_files, *test_files, meta_file]

    def missing_files() -> list[str]:
        return [f for f in expected if not (root / folder_name / f).is_file()]

    missing = missing_files()
    if missing and not download:
        raise UserError(_missing_cifar_message(name, root, missing, None))
    if missing:
        reason = _download_cifar(name, root, download_timeout)
        if reason is None and missing_files():
            reason = "the archive did not contain every expected file"
        if reason is not None:
            raise UserError(_missing_cifar_message(name, root, missing_files(), reason))
    return (CIFARPickleDataset(root, name, train=True, transform=train_transform),
            CIFARPickleDataset(root, name, train=False, transform=test_transform))
