"""Evaluate a trained EigenGAN checkpoint: traversals, FID, PPL and VP pairs.

The image size and architecture come from the checkpoint, and the EMA generator is used.
FID and PPL are merged into ``metrics.json`` of the run folder that contains the checkpoint
(``RUN/checkpoints/last.pt`` -> ``RUN/metrics.json``) or of ``--run_dir``. Images and VP pairs
go only into ``--out``.

    python eigengan/test.py runs/ffhq_nog/checkpoints/last.pt --traverse --out runs/ffhq_nog/eval
    python eigengan/test.py CKPT --evaluate_FID --evaluate_PPL
    python eigengan/test.py CKPT --evaluate_VP --n_pairs 10000 --out runs/ffhq_nog/vp_pairs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eigengan import evaluate  # noqa: E402
from models.images import ImageFolderDataset  # noqa: E402
from models.metrics import MissingWeightsError, load_inception, load_lpips  # noqa: E402
from models.runs import (HelpFormatter, UserError, load_checkpoint, run_main,  # noqa: E402
                         select_device, update_metrics)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the evaluation flags."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('ckpt', type=Path, help='checkpoint written by train_ffhq.py or '
                                                'train_animeface.py')

    tasks = parser.add_argument_group('tasks')
    tasks.add_argument('--traverse', action='store_true',
                       help='write samples.png and traverse/layerL_dimD.png into --out')
    tasks.add_argument('--evaluate_FID', action='store_true', help='FID against --data')
    tasks.add_argument('--evaluate_PPL', action='store_true', help='perceptual path length')
    tasks.add_argument('--evaluate_VP', action='store_true',
                       help='write --n_pairs VP pairs into --out')

    out = parser.add_argument_group('outputs')
    out.add_argument('--out', type=Path, default=None,
                     help='output folder for traversals and VP pairs (required by those tasks)')
    out.add_argument('--run_dir', type=Path, default=None,
                     help='folder whose metrics.json receives FID and PPL (default: the run '
                          'folder that contains the checkpoint)')

    settings = parser.add_argument_group('settings')
    settings.add_argument('--data', type=Path, default=None,
                          help='real images for FID (default: the training folder)')
    settings.add_argument('--fid_samples', type=int, default=50_000,
                          help='generated images for FID, and the cap on real images')
    settings.add_argument('--ppl_samples', type=int, default=10_000, help='PPL samples')
    settings.add_argument('--n_pairs', type=int, default=10_000, help='VP pairs')
    settings.add_argument('--vp_extent', type=float, default=4.0,
                          help='VP codes are drawn from U[-extent, extent]')
    settings.add_argument('--truncation', type=float, default=0.7, help='VP noise scale')
    settings.add_argument('--extent', type=float, default=4.0, help='traversal range ±extent')
    settings.add_argument('--n_rows', type=int, default=8, help='samples per traversal image')
    settings.add_argument('--n_steps', type=int, default=9, help='columns per traversal image')
    settings.add_argument('--n_sample', type=int, default=64, help='images in samples.png')
    settings.add_argument('--batch', type=int, default=64, help='generation batch size')

    weights = parser.add_argument_group('pretrained weights')
    weights.add_argument('--inception_weights', type=Path, default=None,
                         help="pt_inception-2015-12-05-6726825d.pth; None looks in torch's "
                              'hub cache')
    weights.add_argument('--lpips_weights', type=Path, default=None,
                         help="vgg16-397923af.pth for LPIPS; None looks in torch's hub cache")
    weights.add_argument('--skip_missing_weights', action='store_true',
                         help='skip FID or PPL with one line when their weights are absent')

    system = parser.add_argument_group('system')
    system.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    system.add_argument('--seed', type=int, default=0, help='seed of every random draw')
    return parser


def metrics_folder(args) -> Path:
    """Return ``--run_dir`` or the run folder (with a config.json) above the checkpoint."""
    if args.run_dir is not None:
        return args.run_dir
    for folder in args.ckpt.resolve().parents[:2]:
        if (folder / 'config.json').is_file():
            return folder
    raise UserError(f'{args.ckpt} is not inside a run folder (no config.json in its two parent '
                    f'folders); pass --run_dir to say where metrics.json goes')


def evaluate_fid(args, G, device) -> dict:
    """Return the FID entry of metrics.json: the value and the settings it was computed with."""
    data = args.data
    if data is None:
        data = Path(load_checkpoint(args.ckpt)['options']['data'])
    model = load_inception(args.inception_weights, device)
    dataset = ImageFolderDataset(data, size=G.size, flip=False)
    real = evaluate.real_statistics(dataset, model, args.fid_samples, args.batch, device)
    value = evaluate.generated_fid(G, real, model, args.fid_samples, args.batch, device,
                                   torch.Generator().manual_seed(args.seed))
    return {'value': value, 'settings': {
        'generated': args.fid_samples, 'real': min(args.fid_samples, len(dataset)),
        'real_folder': str(data), 'size': G.size, 'network': 'G_ema', 'seed': args.seed,
        'inception': 'pytorch-fid InceptionV3, TF FID weights, pool3 2048-d'}}


def evaluate_ppl(args, G, device) -> dict:
    """Return the PPL entry of metrics.json: the value and the settings it was computed with."""
    model = load_lpips(args.lpips_weights, device)
    values = evaluate.path_lengths(G, model, args.ppl_samples, args.batch, device,
                                   torch.Generator().manual_seed(args.seed))
    return {'value': evaluate.trimmed_mean(values), 'settings': {
        'samples': args.ppl_samples, 'epsilon': evaluate.PPL_EPSILON, 'lpips': 'vgg',
        'codes': 'per layer U[0,1)^n_basis, slerp', 'trim_percentiles': [1, 99],
        'max_side': evaluate.PPL_MAX_SIDE, 'network': 'G_ema', 'seed': args.seed}}


def run_metric(name: str, compute, args, G, device, run_dir: Path) -> None:
    """Compute one metric and merge it into metrics.json, or skip it if its weights are absent."""
    try:
        entry = compute(args, G, device)
    except MissingWeightsError as err:
        if not args.skip_missing_weights:
            raise
        print(f'{name}: skipped, {err}')
        return
    update_metrics(run_dir, **{name.lower(): entry})
    print(f"{name}: {entry['value']:.4f} (written to {run_dir / 'metrics.json'})")


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run the requested evaluations."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.traverse or args.evaluate_FID or args.evaluate_PPL or args.evaluate_VP):
        parser.error('choose at least one of --traverse, --evaluate_FID, --evaluate_PPL, '
                     '--evaluate_VP')
    if (args.traverse or args.evaluate_VP) and args.out is None:
        parser.error('--traverse and --evaluate_VP write images: pass --out FOLDER')
    for flag in ('fid_samples', 'ppl_samples', 'n_pairs', 'n_rows', 'n_steps', 'n_sample',
                 'batch'):
        if getattr(args, flag) < (2 if flag == 'fid_samples' else 1):
            parser.error(f'--{flag} is too small: {getattr(args, flag)}')
    device = select_device(args.device)
    G = evaluate.load_generator(args.ckpt, device)
    run_dir = metrics_folder(args) if (args.evaluate_FID or args.evaluate_PPL) else None

    if args.traverse:
        paths = evaluate.write_traversals(G, args.out, args.n_rows, args.n_steps, args.extent,
                                          args.n_sample, device,
                                          torch.Generator().manual_seed(args.seed))
        print(f'traversals: {len(paths)} images in {args.out}')
    if args.evaluate_FID:
        run_metric('FID', evaluate_fid, args, G, device, run_dir)
    if args.evaluate_PPL:
        run_metric('PPL', evaluate_ppl, args, G, device, run_dir)
    if args.evaluate_VP:
        from models.vp_pairs import write_vp_pairs

        generate = evaluate.vp_generate_fn(G, device, args.vp_extent, args.truncation)
        write_vp_pairs(args.out, generate, args.n_pairs, args.batch, args.seed)
        print(f'VP pairs: {args.n_pairs} in {args.out}')
    return 0


if __name__ == '__main__':
    run_main(main)
