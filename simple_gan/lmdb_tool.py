"""Convert an image folder into an LMDB database, and dump images for FID.

create: every image under FOLDER (recursive) becomes one entry of a new LMDB database, keyed
    by its path relative to FOLDER and holding the file's encoded bytes unchanged (or, with
    --size, the image resized so its shorter side is SIZE, as PNG). This is the format of
    the LSUN release, which simple_gan/train.py --dataset_mode lsun reads.
dump: writes the images of an LMDB database (--dataset_mode lsun) or of an aligned CelebA
    folder (--dataset_mode celeba) as SIZE x SIZE PNG files 000000.png, .... They get the
    same crop and bicubic resize as in training, so FID compares like with like.

Usage (from simple_gan/ or from the repository root):
    python simple_gan/lmdb_tool.py create FOLDER OUT_LMDB
    python simple_gan/lmdb_tool.py dump church_outdoor_train_lmdb lsun_real_128 --size 128
    python simple_gan/lmdb_tool.py dump CELEBA_ROOT celeba_real_128 --dataset_mode celeba
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from PIL import Image  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from models.images import IMAGE_EXTENSIONS, check_image_file, to_rgb  # noqa: E402
from models.lmdb_data import open_lmdb  # noqa: E402
from models.runs import HelpFormatter, UserError, run_main  # noqa: E402
from simple_gan.data import DATASET_MODES, make_dataset  # noqa: E402

# Entries written per LMDB transaction.
COMMIT_EVERY = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    create = commands.add_parser('create', help='image folder -> new LMDB database',
                                 formatter_class=HelpFormatter)
    create.add_argument('folder', help='image folder, searched recursively')
    create.add_argument('output', help='LMDB folder to create (must not exist)')
    create.add_argument('--size', type=int, default=None,
                        help='resize the shorter side to SIZE pixels and store PNG '
                             '(default: store the files unchanged)')
    dump = commands.add_parser('dump', help='LMDB or CelebA folder -> PNG files',
                               formatter_class=HelpFormatter)
    dump.add_argument('source', help='LMDB folder (lsun) or image folder (celeba)')
    dump.add_argument('output', help='folder for the PNG files (must not hold PNG files)')
    dump.add_argument('--dataset_mode', choices=DATASET_MODES, default='lsun',
                      help='how the source is read and cropped, as in train.py')
    dump.add_argument('--size', type=int, default=128, help='side of the PNG files in pixels')
    dump.add_argument('--max_images', type=int, default=None,
                      help='dump only the first N images (default: all)')
    return parser


def encoded_entry(path: Path, size: int | None) -> bytes:
    """Return the bytes stored for one image: the file itself, or a resized PNG."""
    if size is None:
        return path.read_bytes()
    with Image.open(path) as img:
        img = to_rgb(img)
    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    buffer = io.BytesIO()
    img.save(buffer, format='PNG')
    return buffer.getvalue()


def create_lmdb(folder: Path, output: Path, size: int | None) -> int:
    """Write every readable image under ``folder`` into a new LMDB at ``output``."""
    import lmdb

    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found")
    if output.exists():
        raise UserError(f"{output} already exists; choose a new path for the LMDB database")
    paths = sorted(p for p in folder.rglob('*')
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    paths = [p for p in paths if check_image_file(p) is None]
    if not paths:
        raise UserError(f"no readable images in {folder}")

    # The map size is a maximum that the file never reaches unless needed; it doubles on demand.
    map_size = 2 * sum(p.stat().st_size for p in paths) + (64 << 20)
    env = open_lmdb(output, write=True, map_size=map_size)
    try:
        for start in range(0, len(paths), COMMIT_EVERY):
            chunk = [(str(p.relative_to(folder)).encode(), encoded_entry(p, size))
                     for p in paths[start:start + COMMIT_EVERY]]
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in chunk:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()['map_size'] * 2)
        env.sync()
    finally:
        env.close()
    return len(paths)


def dump_images(source: str, output: Path, dataset_mode: str, size: int,
                max_images: int | None) -> int:
    """Write the training view of each image (crop, resize, no flip) as PNG files."""
    if output.is_dir() and any(output.glob('*.png')):
        raise UserError(f"{output} already contains PNG files; choose an empty folder")
    dataset = make_dataset(dataset_mode, source, size, max_images)
    output.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        x = dataset[index]  # (3, size, size) in [-1, 1]
        array = x.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(output / f'{index:06d}.png')
    return len(dataset)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.size is not None and args.size < 1:
        parser.error(f"--size must be at least 1, got {args.size}")
    if args.command == 'create':
        count = create_lmdb(Path(args.folder), Path(args.output), args.size)
        print(f"wrote {count} images to the LMDB database {args.output}")
    else:
        if args.max_images is not None and args.max_images < 1:
            parser.error(f"--max_images must be at least 1, got {args.max_images}")
        count = dump_images(args.source, Path(args.output), args.dataset_mode, args.size,
                            args.max_images)
        print(f"wrote {count} PNG files of {args.size}x{args.size} pixels to {args.output}")
    return 0


if __name__ == '__main__':
    run_main(main)
