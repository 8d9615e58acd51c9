"""Compute the VP disentanglement score of a folder of image pairs.

The Variation Predictability (VP) score of Zhu et al. (ECCV 2020, arXiv 2007.12885): a small
CNN learns to tell from a pair of generated images which latent dimension was changed between
them, and the score is its top-1 accuracy on held-out pairs. A generator whose latent dimensions
each control one visible factor makes this easy, so a higher score means more disentanglement.

The input is a VP pairs folder, as written by gen_pairs.py and eigengan/test.py:
000000.png, 000001.png, ... (one RGB image per pair, left half from z1 and right half from z2),
labels.npy (float32 (n, d), row k = z1 - z2 of pair k, exactly one nonzero entry per row) and
codes.npz. The published protocol (Adam lr 5e-4, batch 32, 300 epochs, 1% of the pairs for
training and 99% for testing, best test accuracy, mean of 3 runs) is the default.

Usage:
    python vp_score.py results/celeba_nog/vp_pairs --run_dir results/celeba_nog
    python vp_score.py PAIRS --out vp.json --device cuda          # keep the full JSON report
    python vp_score.py PAIRS --epochs 5 --seeds 0 --test_ratio 0.5 --device cpu   # quick check
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from models.runs import (HelpFormatter, UserError, environment_versions, run_main, seed_everything,
                         select_device, to_plain, update_metrics, write_json_atomic)

PAIR_NAME = re.compile(r'^\d+\.png$')


# ---------------------------------------------------------------------------------------------
# Pairs folder
# ---------------------------------------------------------------------------------------------

def load_labels(folder: Path) -> np.ndarray:
    """Load ``labels.npy`` (float (n, d), z1 - z2) and check that each row changes one dimension.

    Raises ``UserError`` naming the file when it is missing, not 2-D, or has a row with no
    nonzero entry or with more than one.
    """
    path = folder / 'labels.npy'
    if not path.is_file():
        raise UserError(f"{path} not found: a VP pairs folder needs labels.npy with z1 - z2 of "
                        f"each pair (write one with gen_pairs.py)")
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} could not be read as a NumPy array ({err})") from err
    if labels.ndim != 2 or labels.shape[1] < 2:
        raise UserError(f"{path} has shape {labels.shape}; expected (n_pairs, latent_dim) "
                        f"with latent_dim >= 2")

    changed = np.count_nonzero(labels, axis=1)
    bad = np.flatnonzero(changed != 1)
    if bad.size:
        k = int(bad[0])
        raise UserError(f"{path}: {bad.size} of {len(labels)} rows do not change exactly one "
                        f"latent dimension (row {k} changes {int(changed[k])}); each pair must "
                        f"differ in one dimension only")
    return labels.astype(np.float32)


def targets_from_labels(labels: np.ndarray, rule: str) -> np.ndarray:
    """Return the class of each pair: the index of the changed latent dimension.

    ``abs`` takes argmax |z1 - z2|, the dimension that changed. ``signed`` takes
    argmax (z1 - z2), which is what the VP classifier of zhuxinqimac/VP-metric-pytorch
    (``np.argmax(label)`` in pair_dataset.py) computes from these labels. For a row whose only
    nonzero entry is negative, that argmax falls on a zero entry (index 0, or 1 when dimension 0
    is the one that changed), so every pair with a negative change gets a wrong class.
    """
    if rule == 'abs':
        return np.abs(labels).argmax(axis=1)
    if rule == 'signed':
        return labels.argmax(axis=1)
    raise ValueError(f"unknown label rule {rule!r}")


def _list_pair_images(folder: Path) -> list[Path]:
    paths = sorted((p for p in folder.iterdir() if PAIR_NAME.match(p.name)),
                   key=lambda p: int(p.stem))
    for k, path in enumerate(paths):
        if int(path.stem) != k:
            raise UserError(f"{folder}: the pair images are not numbered 0 to {len(paths) - 1} "
                            f"without gaps ({k:06d}.png is missing)")
    return paths


def _read_pair(path: Path, image_size: int | None) -> np.ndarray:
    """Read one side-by-side image into a uint8 array (6, H, W): left RGB, then right RGB."""
    with Image.open(path) as image:
        image = image.convert('RGB')
    width, height = image.size
    if width != 2 * height:
        raise UserError(f"{path} is {width}x{height} pixels; a pair image must be twice as wide "
                        f"as high (left half from z1, right half from z2)")
    halves = [image.crop((0, 0, height, height)), image.crop((height, 0, width, height))]
    if image_size is not None and image_size != height:
        halves = [half.resize((image_size, image_size), Image.Resampling.BICUBIC)
                  for half in halves]
    return np.concatenate([np.asarray(half).transpose(2, 0, 1) for half in halves])


def load_pairs(folder: str | Path, image_size: int | None = None,
               workers: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Load a VP pairs folder into memory.

    Returns the images as a uint8 tensor (n, 6, H, W), left RGB then right RGB (10,000 pairs
    take 0.25 GB at 64 px and 1 GB at 128 px), and the labels (n, d). ``image_size`` resizes
    each half to that many pixels. ``workers`` threads decode the PNG files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"pairs folder {folder} not found; write one with gen_pairs.py")
    labels = load_labels(folder)
    paths = _list_pair_images(folder)
    if len(paths) != len(labels):
        raise UserError(f"{folder} has {len(paths)} pair images but labels.npy has "
                        f"{len(labels)} rows; the two must match one to one")

    def read(path: Path) -> np.ndarray:
        return _read_pair(path, image_size)

    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(tqdm(pool.map(read, paths), total=len(paths), desc='load', leave=False))
    else:
        arrays = [read(path) for path in tqdm(paths, desc='load', leave=False)]
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise UserError(f"{folder}: the pair images differ in size ({sorted(shapes)}); "
                        f"pass --image_size to resize them to one size")
    return torch.from_numpy(np.stack(arrays)), labels


# ---------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------

def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int,
                  stride: int = 1) -> list[nn.Module]:
    # No conv bias: the batch norm right after it has its own shift.
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                      bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class VPClassifier(nn.Sequential):
    """The VP classifier of Zhu et al. (ECCV 2020, arXiv 2007.12885).

    conv 7x7/2 (64) - conv 3x3 (64) - max-pool 3x3/2 - conv 3x3 (128) - conv 3x3 (256), each
    conv followed by batch norm and ReLU, then global average pooling and a linear layer.
    Input (N, in_channels, H, W): 3 channels for the difference of the two images, 6 for
    their concatenation. Output (N, num_classes) logits, one class per latent dimension.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(*_conv_bn_relu(in_channels, 64, 7, stride=2),
                         *_conv_bn_relu(64, 64, 3),
                         nn.MaxPool2d(3, stride=2, padding=1),
                         *_conv_bn_relu(64, 128, 3),
                         *_conv_bn_relu(128, 256, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(256, num_classes))


def make_inputs(pairs: torch.Tensor, mode: str) -> torch.Tensor:
    """Map uint8 pairs (N, 6, H, W) to classifier inputs in [-1, 1] units.

    ``diff`` returns x1 - x2 (N, 3, H, W), ``concat`` returns [x1, x2] (N, 6, H, W).
    """
    x = pairs.float() / 127.5 - 1
    if mode == 'diff':
        return x[:, :3] - x[:, 3:]
    if mode == 'concat':
        return x
    raise ValueError(f"unknown input mode {mode!r}")


@torch.no_grad()
def predict(model: nn.Module, pairs: torch.Tensor, mode: str,
            batch_size: int = 256) -> torch.Tensor:
    """Return the predicted class of every pair (N,), with the model in evaluation mode."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [model(make_inputs(pairs[i:i + batch_size].to(device), mode)).argmax(1).cpu()
              for i in range(0, len(pairs), batch_size)]
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

def split_indices(n: int, test_ratio: float, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split range(n) at random into (train, test) with round(n * test_ratio) test pairs."""
    n_test = int(round(n * test_ratio))
    if n_test < 1 or n - n_test < 1:
        raise UserError(f"--test_ratio {test_ratio} leaves {n - n_test} training and {n_test} "
                        f"test pairs out of {n}; both need at least one")
    order = torch.randperm(n, generator=generator)
    return order[n_test:], order[:n_test]


def train_run(pairs: torch.Tensor, targets: np.ndarray, num_classes: int, seed: int,
              args: argparse.Namespace, device: torch.device, desc: str = 'VP') -> dict:
    """Train one VP classifier and return its scores (top-1 accuracy in percent).

    ``targets`` (n,) are the classes from ``targets_from_labels``. The seed sets the train/test
    split, the initial weights and the batch order. Returns {'seed', 'best', 'best_epoch',
    'final', 'n_train', 'n_test', 'seconds'} and, under the key 'model', the classifier after
    the last epoch.
    """
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = split_indices(len(pairs), args.test_ratio, generator)
    labels = torch.from_numpy(targets).long()
    # The uint8 pairs move to the device once (1 GB for 10,000 pairs at 128 px), so a batch is
    # an index on the device, not a copy from the host.
    x_train, y_train = pairs[train_idx].to(device), labels[train_idx].to(device)
    x_test, y_test = pairs[test_idx].to(device), labels[test_idx].to(device)

    in_channels = 3 if args.input_mode == 'diff' else 6
    model = VPClassifier(in_channels, num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    best, best_epoch, final = -1.0, 0, float('nan')
    start = time.time()
    bar = tqdm(range(1, args.epochs + 1), desc=desc, leave=False)
    for epoch in bar:
        # Train one epoch on shuffled mini-batches
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            batch = order[i:i + args.batch_size]
            logits = model(make_inputs(x_train[batch], args.input_mode))
            loss = F.cross_entropy(logits, y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += (logits.argmax(1) == y_train[batch]).sum().item()

        # Evaluate on the test pairs
        if epoch % args.eval_every and epoch != args.epochs:
            continue
        predicted = predict(model, x_test, args.input_mode, args.eval_batch_size)
        final = 100.0 * (predicted == y_test.cpu()).float().mean().item()
        if final > best:
            best, best_epoch = final, epoch
        elapsed = time.time() - start
        bar.write(f"{desc} | epoch {epoch:4d}/{args.epochs} | loss {loss_sum / len(order):.4f} "
                  f"| train acc {100.0 * correct / len(order):5.1f}% | test acc {final:5.1f}% "
                  f"| best {best:5.1f}% (epoch {best_epoch}) | {elapsed / epoch:.2f} s/epoch")
    bar.close()
    return {'seed': seed, 'best': best, 'best_epoch': best_epoch, 'final': final,
            'n_train': len(train_idx), 'n_test': len(test_idx),
            'seconds': time.time() - start, 'model': model}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=HelpFormatter)
    parser.add_argument('pairs_dir', type=Path, help="VP pairs folder (000000.png ..., "
                        "labels.npy, codes.npz)")

    data = parser.add_argument_group('data')
    data.add_argument('--image_size', type=int, default=None,
                      help="resize each half to this many pixels (default: keep the size); "
                           "10,000 pairs take 0.25 GB of memory at 64 px, 1 GB at 128 px and "
                           "4 GB at 256 px")
    data.add_argument('--input_mode', choices=('diff', 'concat'), default='diff',
                      help="classifier input: the difference of the two images (3 channels) "
                           "or their concatenation (6 channels)")
    data.add_argument('--label_rule', choices=('abs', 'signed'), default='abs',
                      help="class of a pair: argmax |z1 - z2| (the changed dimension) or "
                           "argmax (z1 - z2), which is what zhuxinqimac/VP-metric-pytorch "
                           "computes from z1 - z2 labels. 'signed' gives every pair whose "
                           "change is negative a wrong class, and published VP scores may "
                           "have been computed with it")
    data.add_argument('--test_ratio', type=float, default=0.99,
                      help="fraction of the pairs held out for testing")

    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--epochs', type=int, default=300, help="training epochs per run")
    optim.add_argument('--batch_size', type=int, default=32, help="training batch size")
    optim.add_argument('--lr', type=float, default=5e-4, help="Adam learning rate")
    optim.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2],
                       help="one run per seed (split, initial weights and batch order); the "
                            "score is the mean and population std of the runs' scores")

    evaluation = parser.add_argument_group('evaluation and output')
    evaluation.add_argument('--eval_every', type=int, default=1,
                            help="evaluate on the test pairs every this many epochs (and after "
                                 "the last); a run's score is its best test accuracy. On a "
                                 "CPU, testing 9,900 pairs dominates the run time")
    evaluation.add_argument('--eval_batch_size', type=int, default=256,
                            help="batch size for testing")
    evaluation.add_argument('--out', type=Path, default=None,
                            help="write a JSON report (settings, per-run scores, versions)")
    evaluation.add_argument('--run_dir', type=Path, default=None,
                            help="run folder of the generator: merge vp_mean and vp_std into "
                                 "its metrics.json")

    system = parser.add_argument_group('system')
    system.add_argument('--device', default='auto', help="auto, cpu, cuda or cuda:N")
    system.add_argument('--workers', type=int, default=4,
                        help="threads that decode the PNG files (0: the main thread)")

    args = parser.parse_args(argv)
    if not 0 < args.test_ratio < 1:
        parser.error(f"--test_ratio must be in (0, 1), got {args.test_ratio}")
    for flag in ('epochs', 'batch_size', 'eval_every', 'eval_batch_size'):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.image_size is not None and args.image_size < 8:
        parser.error(f"--image_size must be at least 8 pixels, got {args.image_size}")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def _settings(args: argparse.Namespace, pairs: torch.Tensor, labels: np.ndarray) -> dict:
    return {'pairs_dir': str(args.pairs_dir.resolve()), 'n_pairs': len(labels),
            'latent_dim': labels.shape[1], 'image_size': pairs.shape[-1],
            'input_mode': args.input_mode, 'label_rule': args.label_rule,
            'test_ratio': args.test_ratio, 'epochs': args.epochs, 'batch_size': args.batch_size,
            'lr': args.lr, 'optimizer': 'Adam', 'seeds': args.seeds,
            'eval_every': args.eval_every,
            'score': 'best test top-1 accuracy (%) of each run; mean and population std '
                     '(ddof=0) over the runs'}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_dir is not None and not args.run_dir.is_dir():
        raise UserError(f"--run_dir {args.run_dir} not found; pass the generator's run folder")
    device = select_device(args.device)

    # Load the pairs and derive the classes
    pairs, labels = load_pairs(args.pairs_dir, args.image_size, args.workers)
    n, d = labels.shape
    targets = targets_from_labels(labels, args.label_rule)
    mislabelled = int((targets != targets_from_labels(labels, 'abs')).sum())
    print(f"{n} pairs of {pairs.shape[-1]}x{pairs.shape[-1]} px images, latent dim {d}, "
          f"input {args.input_mode}, label rule {args.label_rule}, device {device}")
    if mislabelled:
        print(f"note: --label_rule signed gives {mislabelled} of {n} pairs "
              f"({100.0 * mislabelled / n:.1f}%, those with a negative change) a class other "
              f"than the changed dimension")

    # One classifier per seed
    runs = []
    for i, seed in enumerate(args.seeds):
        result = train_run(pairs, targets, d, seed, args, device,
                           desc=f"run {i + 1}/{len(args.seeds)} (seed {seed})")
        del result['model']
        runs.append(result)
    best = np.array([run['best'] for run in runs])
    final = np.array([run['final'] for run in runs])
    print(f"VP score {best.mean():.2f} ± {best.std():.2f}% (best test top-1 accuracy, "
          f"{len(runs)} runs: {', '.join(f'{b:.2f}' for b in best)}); last epoch "
          f"{final.mean():.2f} ± {final.std():.2f}%")

    # Write the report and the run folder's metrics
    settings = _settings(args, pairs, labels)
    if args.out is not None:
        versions = {**environment_versions(), 'pillow': PIL.__version__}
        write_json_atomic(args.out, {
            'vp_mean': best.mean(), 'vp_std': best.std(),
            'final_mean': final.mean(), 'final_std': final.std(),
            'runs': runs, 'n_pairs': n, 'label_rule': args.label_rule,
            'mislabelled_pairs': mislabelled, 'settings': settings,
            'options': to_plain(vars(args)), 'device': str(device),
            'command': [sys.executable, *(sys.argv if argv is None else ['vp_score.py', *argv])],
            'versions': versions})
        print(f"wrote {args.out}")
    if args.run_dir is not None:
        update_metrics(args.run_dir, vp_mean={'value': best.mean(), 'settings': settings},
                       vp_std={'value': best.std(), 'settings': settings})
        print(f"merged vp_mean and vp_std into {args.run_dir / 'metrics.json'}")
    return 0


if __name__ == '__main__':
    run_main(main)
