"""Tests of the CIFAR pickle reader, the download fallback and the digits data (models/data.py).

The CIFAR folders are tiny copies written here in the official pickle format, and nothing
is downloaded.
"""
import pickle
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10

from models import data
from models.data import CIFARPickleDataset, DigitsDataset, UserError, load_datasets

# Official file names of the two "python version" archives.
CIFAR_LAYOUT = {
    'cifar100': ('cifar-100-python', ['train'], ['test'], 'meta', 'fine_labels',
                 'fine_label_names'),
    'cifar10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)],
                ['test_batch'], 'batches.meta', 'labels', 'label_names'),
}
ARCHIVES = {'cifar100': 'cifar-100-python.tar.gz', 'cifar10': 'cifar-10-python.tar.gz'}


def write_pickle(path, obj):
    # Protocol 2 with NumPy 1's module name, as close as Python 3 gets to the official
    # Python 2 files.
    content = pickle.dumps(obj, protocol=2).replace(b'numpy._core.multiarray',
                                                    b'numpy.core.multiarray')
    path.write_bytes(content)


def write_cifar(root, name, per_file=4, seed=0):
    """Write a tiny CIFAR folder under ``root`` and return {file name: (data, labels)}."""
    folder_name, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    folder = root / folder_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_classes = data.NUM_CLASSES[name]
    written = {}
    for file_name in train_files + test_files:
        pixels = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, size=per_file).tolist()
        batch = {b'data': pixels, label_key.encode(): labels,
                 b'filenames': [f'img_{i}.png'.encode() for i in range(per_file)]}
        if name == 'cifar100':
            batch[b'coarse_labels'] = [label // 5 for label in labels]
        write_pickle(folder / file_name, batch)
        written[file_name] = (pixels, labels)
    write_pickle(folder / meta_file,
                 {names_key.encode(): [f'class{i}'.encode() for i in range(n_classes)]})
    return written


# ---------------------------------------------------------------------------------------------
# CIFAR pickle folders
# ---------------------------------------------------------------------------------------------

def test_layout_matches_torchvision():
    for name, (folder_name, train_files, test_files, meta_file, _, _) in CIFAR_LAYOUT.items():
        assert data.cifar_files(name) == (folder_name, train_files, test_files, meta_file)


@pytest.mark.parametrize('name', ['cifar100', 'cifar10'])
def test_cifar_pickle_read_back(tmp_path, name):
    written = write_cifar(tmp_path, name)
    _, train_files, test_files, *_ = CIFAR_LAYOUT[name]

    train_set, test_set = load_datasets(name, tmp_path, download=False)
    assert len(train_set) == 4 * len(train_files), len(train_set)
    assert len(test_set) == 4 * len(test_files), len(test_set)
    assert train_set.classes[:2] == ['class0', 'class1'], train_set.classes[:2]

    # The last image of the last training file: channel c of pixel (row, col) is stored at
    # c * 1024 + row * 32 + col.
    pixels, labels = written[train_files[-1]]
    image, label = train_set[len(train_set) - 1]
    assert isinstance(image, Image.Image)
    assert image.mode == 'RGB', image.mode
    assert image.size == (32, 32), image.size
    expected = pixels[-1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(image), expected)
    assert type(label) is int, type(label)
    assert label == labels[-1], label

    test_pixels, test_labels = written[test_files[0]]
    assert np.array_equal(np.asarray(test_set[0][0]),
                          test_pixels[0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert test_set.targets == test_labels


def test_cifar_transform_applied(tmp_path):
    write_cifar(tmp_path, 'cifar10')
    dataset = CIFARPickleDataset(tmp_path, 'cifar10', train=False,
                                 transform=lambda image: np.asarray(image).shape)
    assert dataset[0][0] == (32, 32, 3), dataset[0][0]


@pytest.mark.parametrize('name', ['cifar100', 'cifar10'])
def test_incomplete_folder_no_download(tmp_path, name, monkeypatch):
    def fail_download(*args, **kwargs):
        raise AssertionError('a download was attempted')

    monkeypatch.setattr(data, '_download_cifar', fail_download)
    write_cifar(tmp_path, name)
    folder_name, _, test_files, *_ = CIFAR_LAYOUT[name]
    (tmp_path / folder_name / test_files[0]).unlink()

    with pytest.raises(UserError) as info:
        load_datasets(name, tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / folder_name) in message, message
    assert test_files[0] in message, message
    assert ARCHIVES[name] in message, message
    assert '--no_download' in message, message
    assert '--data_root' in message, message


def test_missing_folder_no_download(tmp_path):
    with pytest.raises(UserError) as info:
        load_datasets('cifar100', tmp_path / 'absent', download=False)
    message = str(info.value)
    assert 'train, test, meta' in message, message
    assert 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz' in message, message
    assert not (tmp_path / 'absent').exists()


def test_download_time_limit(tmp_path, monkeypatch):
    """A server that accepts the connection and never responds: the attempt stops in time."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    monkeypatch.setattr(CIFAR10, 'url', f'http://127.0.0.1:{port}/cifar-10-python.tar.gz')

    start = time.monotonic()
    with pytest.raises(UserError) as info:
        load_datasets('cifar10', tmp_path / 'root', download=True, download_timeout=2.0)
    elapsed = time.monotonic() - start
    server.close()

    message = str(info.value)
    assert 'failed' in message, message
    assert str(tmp_path / 'root') in message, message
    assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f} s with a 2 s limit"
    assert [p.name for p in tmp_path.iterdir()] == ['root'], list(tmp_path.iterdir())


def test_corrupted_pickle_named(tmp_path):
    write_cifar(tmp_path, 'cifar100')
    path = tmp_path / 'cifar-100-python' / 'train'
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError) as info:
        CIFARPickleDataset(tmp_path, 'cifar100', train=True)
    assert str(path) in str(info.value), str(info.value)


class OpenOnLoad:
    """Pickles as a call to ``open``: loading it with plain ``pickle`` would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), 'w')


def test_pickle_with_foreign_object_rejected(tmp_path):
    write_cifar(tmp_path, 'cifar10')
    path = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    marker = tmp_path / 'created_by_pickle'
    path.write_bytes(pickle.dumps({b'data': OpenOnLoad(marker), b'labels': []}))

    with pytest.raises(UserError, match='unexpected object io.open'):
        CIFARPickleDataset(tmp_path, 'cifar10', train=False)
    assert not marker.exists()


def test_wrong_array_shape_rejected(tmp_path):
    write_cifar(tmp_path, 'cifar10')
    path = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    write_pickle(path, {b'data': np.zeros((4, 1024), np.uint8), b'labels': [0, 1, 2, 3]})
    with pytest.raises(UserError, match=r'expected uint8 of shape \(N, 3072\)'):
        CIFARPickleDataset(tmp_path, 'cifar10', train=False)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(UserError, match='cifar100, cifar10, digits'):
        load_datasets('mnist', tmp_path)


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits_split():
    return DigitsDataset(train=True), DigitsDataset(train=False)


def test_digits_split_sizes_disjoint(digits_split):
    train_set, test_set = digits_split
    assert (len(train_set), len(test_set)) == (1437, 360)
    assert len(set(train_set.indices) | set(test_set.indices)) == 1797
    assert not set(train_set.indices) & set(test_set.indices)


def test_digits_split_stratified(digits_split):
    counts = np.bincount(digits_split[1].targets, minlength=10)
    assert counts.min() >= 35, counts
    assert counts.max() <= 37, counts


def test_digits_split_fixed(digits_split):
    from models.runs import seed_everything

    seed_everything(123)  # the training seed must not move the split
    again = DigitsDataset(train=False)
    assert np.array_equal(again.indices, digits_split[1].indices)
    other = DigitsDataset(train=False, split_seed=1)
    assert not np.array_equal(other.indices, digits_split[1].indices)


def test_digits_images(digits_split):
    from sklearn.datasets import load_digits

    train_set, _ = digits_split
    image, label = train_set[5]
    assert image.mode == 'RGB', image.mode
    assert image.size == (32, 32), image.size
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert label == load_digits().target[train_set.indices[5]]
    assert train_set.data.min() == 0, train_set.data.min()
    assert train_set.data.max() == 255, train_set.data.max()


def test_digits_mean_std_constants(digits_split):
    pixels = digits_split[0].data.astype(np.float64) / 255.0
    mean, std = data.MEAN_STD['digits']
    assert abs(pixels.mean() - mean[0]) < 1e-3, pixels.mean()
    assert abs(pixels.std() - std[0]) < 1e-3, pixels.std()


def test_load_datasets_digits(tmp_path):
    train_set, test_set = load_datasets('digits', tmp_path / 'unused', download=False)
    assert len(train_set) + len(test_set) == 1797
    assert not (tmp_path / 'unused').exists()
