"""Write scikit-learn's 1,797 handwritten digits as an image folder (no download needed).

Each 8 × 8 digit (16 grey levels) is scaled to 0..255, enlarged to --size pixels with bicubic
interpolation and saved as a grayscale PNG under OUT/<label>/. The folder then serves as a small
real-image dataset for a CPU quick start of the GAN trainers:

    python tools/digits_to_folder.py data/digits
    python eigengan/train_ffhq.py data/digits --size 32 --reg_type nog ...
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.runs import HelpFormatter, UserError, run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('out', type=Path, help='output folder (must not contain PNG files yet)')
    parser.add_argument('--size', type=int, default=32, help='image side in pixels')
    parser.add_argument('--invert', action='store_true', help='dark digits on a white ground')
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f'--size must be at least 8, got {args.size}')
    if args.out.exists() and any(args.out.rglob('*.png')):
        raise UserError(f'{args.out} already contains PNG files; choose an empty or new folder')
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)  # (1797, 8, 8)
    if args.invert:
        pixels = 255 - pixels
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = args.out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(image, mode='L').resize((args.size, args.size), Image.BICUBIC)
        big.save(folder / f'{index:04d}.png')
    print(f'wrote {len(pixels)} digits of {args.size} x {args.size} pixels to {args.out}')
    return 0


if __name__ == '__main__':
    run_main(main)
