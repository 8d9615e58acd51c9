"""Tests of the image-folder dataset: colour modes, broken files, errors, value range."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from models.images import ImageFolderDataset, check_image_file, to_rgb
from models.runs import UserError


def make_image_folder(root, n_good=6, size=40, seed=0):
    """Write good RGB images plus broken and unusual files; return the broken names.

    Good: ``n_good`` RGB JPEG/PNG images in two sub-folders, one grayscale PNG, one RGBA PNG,
    one 16-bit grayscale PNG and one palette GIF. Broken: an empty JPEG, a truncated JPEG,
    a truncated PNG and a text file with a .png suffix.
    """
    rng = np.random.default_rng(seed)
    (root / 'a').mkdir(parents=True)
    (root / 'b' / 'c').mkdir(parents=True)
    for i in range(n_good):
        array = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
        folder, suffix = (root / 'a', '.jpg') if i % 2 else (root / 'b' / 'c', '.png')
        Image.fromarray(array).save(folder / f'good{i}{suffix}')
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / 'gray.png')
    rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode='RGBA').save(root / 'rgba.png')
    deep = (rng.integers(0, 65536, (size, size))).astype(np.uint16)
    Image.fromarray(deep).save(root / 'deep16.png')
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert('P').save(
        root / 'palette.gif')
    (root / 'empty.jpg').write_bytes(b'')
    full = root / 'a' / 'good1.jpg'
    (root / 'cut.jpg').write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full = root / 'b' / 'c' / 'good0.png'
    (root / 'cut.png').write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (root / 'notes.png').write_text('not an image')
    return {'empty.jpg', 'cut.jpg', 'cut.png', 'notes.png'}


def test_mixed_folder_skips_broken(tmp_path):
    broken = make_image_folder(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    with pytest.warns(UserWarning, match='skipped 4 of 14') as record:
        dataset = ImageFolderDataset(tmp_path, size=32)
    assert len(record) == 1, f'expected one warning, got {[str(w.message) for w in record]}'
    names = {p.name for p in dataset.paths}
    assert not names & broken, f'broken files kept: {names & broken}'
    assert len(dataset) == 10, f'expected 10 readable images, got {len(dataset)}'
    after = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    assert after == before, 'the dataset changed or deleted a file'


def test_items_are_rgb_in_range(tmp_path):
    make_image_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dataset = ImageFolderDataset(tmp_path, size=32)
    for i in range(len(dataset)):
        x = dataset[i]
        assert x.shape == (3, 32, 32), f'{dataset.paths[i].name}: shape {tuple(x.shape)}'
        assert x.dtype == torch.float32
        assert x.min() >= -1.0, f'{dataset.paths[i].name}: min {x.min()}'
        assert x.max() <= 1.0, f'{dataset.paths[i].name}: max {x.max()}'


def test_sixteen_bit_is_rescaled():
    deep = np.full((4, 4), 32768, dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(deep)))
    assert rgb.shape == (4, 4, 3)
    assert abs(int(rgb[0, 0, 0]) - 128) <= 1, f'mid-grey 16-bit became {rgb[0, 0, 0]}'


def test_decode_failure_substitutes(tmp_path):
    make_image_folder(tmp_path, n_good=2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dataset = ImageFolderDataset(tmp_path, size=16, flip=False)
    # A file damaged after start-up passes the header check but fails to decode.
    dataset.paths[0].write_bytes(b'garbage')
    with pytest.warns(UserWarning, match='failed to decode'):
        x = dataset[0]
    assert torch.equal(x, dataset[1]), 'the next image should stand in for the broken one'
    assert dataset.decode_failures == [dataset.paths[0]]


def test_header_check_reasons(tmp_path):
    make_image_folder(tmp_path, n_good=2)
    assert check_image_file(tmp_path / 'empty.jpg') == 'empty file'
    assert check_image_file(tmp_path / 'cut.jpg') == 'truncated JPEG'
    assert check_image_file(tmp_path / 'cut.png') == 'truncated PNG'
    assert check_image_file(tmp_path / 'gray.png') is None


def test_missing_folder_error(tmp_path):
    with pytest.raises(UserError, match='not found'):
        ImageFolderDataset(tmp_path / 'nowhere', size=32)


def test_empty_folder_error(tmp_path):
    (tmp_path / 'x.txt').write_text('hello')
    with pytest.raises(UserError, match='no readable images'):
        ImageFolderDataset(tmp_path, size=32)


def test_custom_transform_and_flip(tmp_path):
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255  # left half white
    Image.fromarray(array).save(tmp_path / 'half.png')
    dataset = ImageFolderDataset(tmp_path, transform=lambda img: img.crop((0, 0, 8, 8)), flip=True)
    torch.manual_seed(0)
    left_means = {round(float(dataset[0][:, :, :4].mean()), 3) for _ in range(20)}
    assert left_means == {-1.0, 1.0}, f'flip never or always applied: {left_means}'
