"""Latent traversals of trained vanilla GAN generators: one grid per latent dimension and an
animated GIF per checkpoint.

For each base code z ~ N(0, I) (one row per --samples) and each latent dimension d, the
dimension is set to --steps values from -extent to +extent and the images are put side by
side. With --sefa the latent axes are first rotated onto the SeFa directions (Shen and Zhou,
CVPR 2021, arXiv 2007.06600): the left singular vectors of the first layer's weight reshaped
to (nz, C*4*4), in order of decreasing singular value. The base images are the same either
way; only the traversed directions change.

Usage (from simple_gan/ or from the repository root):
    python simple_gan/visualize.py --model_path checkpoints/celeba_nog/latest.pt
    python simple_gan/visualize.py --model_path checkpoints/celeba_nog --sefa --extent 3

Writes, per checkpoint, into FOLDER/CHECKPOINT_NAME/, where FOLDER is traversals/ or
traversals_sefa/ in --save_dir (default: the checkpoint's folder):
    dim_NN.png      rows: samples, columns: values of dimension NN
    traversal.gif   frame t: every dimension at value t, one column per dimension
    frame_NN.png    a few evenly spaced frames of that GIF
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from models.gan import save_image_grid  # noqa: E402
from models.runs import HelpFormatter, UserError, run_main, select_device  # noqa: E402
from simple_gan.networks import Generator, sefa_rotated  # noqa: E402
from simple_gan.trainer import load_generator  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--model_path', nargs='+', required=True,
                        help='checkpoint files of train.py, or run folders (all their '
                             'epoch_NNNN.pt and latest.pt)')
    parser.add_argument('--save_dir', default=None,
                        help='output folder of traversals/ and traversals_sefa/ (default: the '
                             'folder of each checkpoint)')
    parser.add_argument('--samples', type=int, default=8, help='base codes, one row each')
    parser.add_argument('--extent', type=float, default=2.0,
                        help='values run from -extent to +extent')
    parser.add_argument('--steps', type=int, default=9, help='values per traversal')
    parser.add_argument('--n_frames_to_save', type=int, default=3,
                        help='GIF frames also written as PNG (evenly spaced)')
    parser.add_argument('--frame_ms', type=int, default=150, help='GIF frame duration in ms')
    parser.add_argument('--sefa', action='store_true',
                        help='traverse the SeFa directions instead of the latent axes '
                             '(the same as --directions sefa)')
    parser.add_argument('--directions', choices=('axes', 'sefa', 'both'), default='axes',
                        help='latent axes, SeFa directions, or both in one call')
    parser.add_argument('--batch_size', type=int, default=64, help='images per forward pass')
    parser.add_argument('--seed', type=int, default=0, help='seed of the base codes')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    return parser


def find_checkpoints(paths: list[str]) -> list[Path]:
    """Expand run folders into their epoch checkpoints (in order) and latest.pt."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(path.glob('epoch_*.pt')) + sorted(path.glob('latest.pt'))
            if not inside:
                raise UserError(f"{path} contains no epoch_NNNN.pt or latest.pt checkpoint")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"--model_path {path} not found")
    return found


@torch.no_grad()
def generate(G: Generator, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Generate the images of ``codes`` (M, nz) in batches: (M, C, H, W) in [-1, 1], on the CPU."""
    device = next(G.parameters()).device
    parts = [G(chunk.to(device)).cpu() for chunk in codes.split(batch_size)]
    return torch.cat(parts)


def traversal_codes(base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Codes (nz, samples, steps, nz): dimension d of every base code set to each value."""
    samples, nz = base.shape
    codes = base[None, :, None, :].repeat(nz, 1, len(values), 1)
    for d in range(nz):
        codes[d, :, :, d] = values
    return codes


def to_pil(images: torch.Tensor, nrow: int) -> Image.Image:
    grid = make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    array = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def visualize_checkpoint(path: Path, out_dir: Path, sefa: bool, args: argparse.Namespace,
                         device: torch.device) -> None:
    G = load_generator(path, device)
    base = torch.randn(args.samples, G.nz, generator=torch.Generator().manual_seed(args.seed))
    if sefa:
        # Same base images: G'(U^T z) = G(z), and axis j of G' is SeFa direction j.
        G, U = sefa_rotated(G)
        base = base @ U
    values = torch.linspace(-args.extent, args.extent, args.steps)
    codes = traversal_codes(base, values)  # (nz, samples, steps, nz)
    images = generate(G, codes.reshape(-1, G.nz), args.batch_size)
    images = images.reshape(G.nz, args.samples, args.steps, *images.shape[1:])
    out_dir.mkdir(parents=True, exist_ok=True)

    # One grid per dimension: rows are samples, columns the values.
    for d in range(G.nz):
        save_image_grid(images[d].flatten(0, 1), out_dir / f'dim_{d:02d}.png', nrow=args.steps)

    # GIF: frame t shows every dimension at value t (columns) for every sample (rows).
    frames = [to_pil(images[:, :, t].transpose(0, 1).flatten(0, 1), nrow=G.nz)
              for t in range(args.steps)]
    loop = frames + frames[-2:0:-1]  # forward then back, so the animation has no jump
    tmp = out_dir / '.traversal.gif.tmp'
    loop[0].save(tmp, format='GIF', save_all=True, append_images=loop[1:],
                 duration=args.frame_ms, loop=0)
    tmp.replace(out_dir / 'traversal.gif')
    n_saved = min(args.n_frames_to_save, args.steps)
    for i in range(n_saved):
        t = round(i * (args.steps - 1) / max(1, n_saved - 1))
        frames[t].save(out_dir / f'frame_{t:02d}.png')
    print(f"{path}: {G.nz} traversal grids and traversal.gif in {out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ('samples', 'steps', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.extent <= 0 or args.n_frames_to_save < 0:
        parser.error("--extent must be positive and --n_frames_to_save not negative")
    device = select_device(args.device)
    directions = 'sefa' if args.sefa else args.directions
    sefa_modes = {'axes': [False], 'sefa': [True], 'both': [False, True]}[directions]
    for path in find_checkpoints(args.model_path):
        for sefa in sefa_modes:
            folder = 'traversals_sefa' if sefa else 'traversals'
            parent = path.parent if args.save_dir is None else Path(args.save_dir)
            visualize_checkpoint(path, parent / folder / path.stem, sefa, args, device)
    return 0


if __name__ == '__main__':
    run_main(main)
