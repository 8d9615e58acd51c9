"""Generate the image pairs of the VP disentanglement score from a generator checkpoint.

The VP score (Zhu et al., ECCV 2020, arXiv 2007.12885) trains a classifier to tell which latent
dimension changed between two images. Each pair here has codes that differ in exactly one
dimension:
  - vanilla GAN (--model_type gan or gan128): z1 ~ U[-2, 2]^nz, and z2 is z1 with one
    dimension, chosen uniformly, drawn again from U[-2, 2]. With --sefa the codes live in the
    SeFa coordinates (the latent axes rotated onto the left singular vectors of the first
    layer's weight), so each pair moves along one SeFa direction.
  - EigenGAN (--model_type eigengan): subspace codes ~ U[-4, 4] over all layers with one
    coordinate drawn again, and shared noise scaled by 0.7 (truncation).

Usage:
    python gen_pairs.py --model_type gan128 --model_path checkpoints/celeba_nog/latest.pt \\
        --save_dir checkpoints/celeba_nog/vp_pairs
    python gen_pairs.py --model_type eigengan --model_path RUN/checkpoints/last.pt \\
        --save_dir RUN/vp_pairs

Writes into --save_dir: 000000.png ... (left z1, right z2, RGB), labels.npy (float32 (n, d),
row k = z1 - z2), codes.npz (z1, z2 and any noise) and --sample_dir (default
--save_dir/samples) with the left image of each pair, for FID.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from models.runs import HelpFormatter, UserError, run_main, select_device  # noqa: E402
from models.vp_pairs import write_vp_pairs  # noqa: E402

MODEL_TYPES = ('gan', 'gan128', 'eigengan')
# Vanilla GAN codes of the VP pairs are uniform on [-CODE_RANGE, CODE_RANGE].
CODE_RANGE = 2.0
# EigenGAN subspace codes are uniform on [-4, 4]; its noise is N(0, I) scaled by 0.7.
EIGENGAN_CODE_RANGE = 4.0
EIGENGAN_TRUNCATION = 0.7


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--model_type', choices=MODEL_TYPES, required=True,
                        help='gan/gan128: vanilla GAN of simple_gan/; eigengan: EigenGAN')
    parser.add_argument('--model_path', required=True, help='generator checkpoint')
    parser.add_argument('--nz', type=int, default=None,
                        help='latent size of a vanilla GAN (default: from the checkpoint)')
    parser.add_argument('--nc_out', type=int, default=None,
                        help='image channels of a vanilla GAN (default: from the checkpoint)')
    parser.add_argument('--sefa', action='store_true',
                        help='vanilla GAN: change one SeFa coordinate instead of one latent axis')
    parser.add_argument('--n_pairs', type=int, default=10000, help='number of pairs')
    parser.add_argument('--batch_size', type=int, default=100, help='pairs per forward pass')
    parser.add_argument('--seed', type=int, default=0, help='seed of the codes')
    parser.add_argument('--save_dir', required=True, help='output folder (must not hold pairs)')
    parser.add_argument('--sample_dir', default=None,
                        help='folder for the left images (default: SAVE_DIR/samples)')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    return parser


def one_dimension_pairs(batch: int, nz: int, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes z1, z2 ~ U[-2, 2]^nz (batch, nz) that differ in exactly one dimension each."""
    z1 = (torch.rand(batch, nz, generator=generator) * 2 - 1) * CODE_RANGE
    changed = torch.randint(0, nz, (batch,), generator=generator)
    redrawn = (torch.rand(batch, generator=generator) * 2 - 1) * CODE_RANGE
    z2 = z1.clone()
    z2[torch.arange(batch), changed] = redrawn
    return z1, z2


def vanilla_generate_fn(args: argparse.Namespace, device: torch.device):
    """The pair function of a vanilla GAN checkpoint (optionally in SeFa coordinates)."""
    from simple_gan.networks import sefa_rotated
    from simple_gan.trainer import load_generator

    G = load_generator(args.model_path, device, model=args.model_type, nz=args.nz,
                       nc_out=args.nc_out)
    if args.sefa:
        G, _ = sefa_rotated(G)

    def generate(batch: int, generator: torch.Generator):
        z1, z2 = one_dimension_pairs(batch, G.nz, generator)
        img1, img2 = G(z1.to(device)), G(z2.to(device))
        return img1, img2, {'z1': z1, 'z2': z2}, z1 - z2

    return generate


def eigengan_generate_fn(args: argparse.Namespace, device: torch.device):
    """The pair function of an EigenGAN checkpoint, from the eigengan package."""
    if args.sefa:
        raise UserError("--sefa applies to the vanilla GAN only (--model_type gan or gan128)")
    if args.nz is not None or args.nc_out is not None:
        raise UserError("--nz and --nc_out apply to the vanilla GAN only; an EigenGAN "
                        "checkpoint stores its own sizes")
    from eigengan.evaluate import load_generator, vp_generate_fn

    # The EMA generator, as for every EigenGAN evaluation.
    G = load_generator(args.model_path, device, use_ema=True)
    return vp_generate_fn(G, device, extent=EIGENGAN_CODE_RANGE, truncation=EIGENGAN_TRUNCATION)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n_pairs < 1 or args.batch_size < 1:
        parser.error("--n_pairs and --batch_size must be at least 1")
    if not Path(args.model_path).is_file():
        raise UserError(f"--model_path {args.model_path} not found")
    device = select_device(args.device)
    if args.model_type == 'eigengan':
        generate = eigengan_generate_fn(args, device)
    else:
        generate = vanilla_generate_fn(args, device)
    write_vp_pairs(args.save_dir, generate, args.n_pairs, args.batch_size, args.seed,
                   sample_dir=args.sample_dir)
    print(f"wrote {args.n_pairs} pairs, labels.npy and codes.npz to {args.save_dir}")
    return 0


if __name__ == '__main__':
    run_main(main)
