"""Time the SVD meta-layer and the nearest-orthogonal-gradient step against their references.

Sections (``--sections``, default all):

* ``meta``: forward + backward of ZCANormBatch with each inverse-square-root backend against
  nn.BatchNorm2d, at 64 channels on 128x64x32x32 (the CIFAR stem of arXiv 2207.02119) and at
  256 and 512 channels. Ratios are relative to BatchNorm2d.
* ``nog``: models.orthogonality.nearest_orthogonal with each method against U V^T from
  torch.linalg.svd, at the pre-SVD gradient shapes 64x27 (CIFAR stem), 30x16384 and 6x524288
  (GAN layers). Ratios are relative to the torch.linalg.svd reference.

Each time is the median of ``--repeats`` timed runs after warm-up runs, synchronised on CUDA.
A new section is a function ``(args, device) -> list[Row]`` added to ``SECTIONS``.

Usage:
    python benchmarks/benchmark.py                             # all sections, default device
    python benchmarks/benchmark.py --device cpu --threads 2 --markdown results.md
    python benchmarks/benchmark.py --quick --repeats 1         # smoke run in seconds
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.runs import UserError, run_main, select_device  # noqa: E402
from models.zca import BACKENDS, ZCANormBatch  # noqa: E402


@dataclass
class Row:
    """One timed case: ``ms`` is the median time, ``ratio`` is ms / reference ms."""
    section: str
    case: str
    method: str
    ms: float
    ratio: float
    note: str = ''


def time_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
            warmup: int = 2) -> dict[str, float]:
    """Return the median wall time in milliseconds of each fn(), synchronised on CUDA.

    The functions run in turns (one call of each per round), so a change in machine load
    during the measurement affects all of them alike rather than whichever ran last.
    """
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bench_meta(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Forward + backward of ZCANormBatch per backend and of nn.BatchNorm2d."""
    if args.quick:
        shapes = [(16, 64, 8, 8), (8, 256, 4, 4)]
    else:
        # N*H*W = 131,072 at 64 channels; fewer positions at 256 and 512 channels keep the
        # 2*C^2*N*H*W-flop products within seconds on a CPU.
        shapes = [(128, 64, 32, 32), (128, 256, 16, 16), (32, 512, 16, 16)]
    rows = []
    for shape in shapes:
        N, C, H, W = shape
        case = f"{N}x{C}x{H}x{W} (N*H*W={N * H * W:,})"
        x = torch.randn(shape, device=device).requires_grad_()
        grad_y = torch.randn(shape, device=device)
        layers = {'BatchNorm2d': nn.BatchNorm2d(C)}
        layers.update({f"ZCA {b}": ZCANormBatch(C, backend=b) for b in BACKENDS})
        steps = {}
        for name, layer in layers.items():
            layer.to(device).train()

            def step(layer=layer):
                x.grad = None
                layer(x).backward(grad_y)

            steps[name] = step
        times = time_ms(steps, device, args.repeats)
        for name, ms in times.items():
            note = ''
            if isinstance(layers[name], ZCANormBatch):
                stats = layers[name].last_stats
                note = f"kappa {stats['kappa']:.3g}, residual {stats['whitening_residual']:.1e}"
            rows.append(Row('meta', case, name, ms, ms / times['BatchNorm2d'], note))
        del x, grad_y
    return rows


def bench_nog(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """nearest_orthogonal per method against U V^T from torch.linalg.svd."""
    try:
        from models.orthogonality import NOG_METHODS, nearest_orthogonal
    except ImportError as err:
        print(f"nog: skipped, models.orthogonality is not importable ({err})")
        return []
    shapes = [(64, 27), (30, 1024), (6, 4096)] if args.quick else \
        [(64, 27), (30, 16384), (6, 524288)]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for m, n in shapes:
        L = torch.randn(m, n, generator=generator).to(device)

        def reference():
            U, _, Vh = torch.linalg.svd(L, full_matrices=False)
            return U @ Vh

        steps = {'torch.linalg.svd U V^T': reference}
        steps.update({f"nearest_orthogonal {method}":
                      lambda method=method: nearest_orthogonal(L, method)[0]
                      for method in NOG_METHODS})
        times = time_ms(steps, device, args.repeats)
        expected = reference()
        ref_ms = times['torch.linalg.svd U V^T']
        for name, step in steps.items():
            note = ''
            if name != 'torch.linalg.svd U V^T':
                note = f"max |Q - U V^T| {(step() - expected).abs().max().item():.1e}"
            rows.append(Row('nog', f"{m}x{n}", name, times[name], times[name] / ref_ms, note))
    return rows


def bench_train_step(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Time one training step of main_cifar100.py per method against a batch-norm stem.

    A step is forward, cross-entropy, backward, NOG and OLR on the stem weight, and the SGD
    step, with the trainer's own parameter groups. The full size is the published run
    (ResNet-50, batch 128, CIFAR-100); --quick uses ResNet-18 at batch 8.
    """
    from main_cifar100 import build_optimizer, build_orthogonal_update, build_parser
    from models.resnet import cifar_resnet

    arch, batch = ('resnet18', 8) if args.quick else ('resnet50', 128)
    variants = {'BatchNorm2d stem': ('batchnorm', []),
                'ZCA baseline': ('zcanormbatch', []),
                'ZCA nog_olr': ('zcanormbatch', ['--nog', '--olr']),
                'ZCA nog_olr_ow': ('zcanormbatch', ['--nog', '--olr', '--ow'])}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 100, (batch,), generator=generator).to(device)
    steps = {}
    for name, (norm, flags) in variants.items():
        options = build_parser().parse_args(['--arch', arch, '--norm', norm, *flags])
        model = cifar_resnet(arch, 100, norm=norm, ow=options.ow).to(device).train()
        optimizer, _ = build_optimizer(model, options)
        updater = build_orthogonal_update(model, optimizer, options)

        def step(model=model, optimizer=optimizer, updater=updater):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            if updater.apply(optimizer.param_groups[0]['lr']):
                optimizer.step()

        steps[name] = step
    times = time_ms(steps, device, args.repeats)
    case = f"{arch}, batch {batch}, 32x32"
    return [Row('train_step', case, name, ms, ms / times['BatchNorm2d stem'])
            for name, ms in times.items()]


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device], list[Row]]] = {
    'meta': bench_meta,
    'nog': bench_nog,
    'train_step': bench_train_step,
}


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def describe_setup(device: torch.device) -> str:
    """Return one line naming the hardware, threads and torch version."""
    if device.type == 'cuda':
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return f"device {device} ({hardware}), torch {torch.__version__}"


def format_table(rows: list[Row], markdown: bool) -> str:
    """Format rows as a fixed-width text table or a Markdown table."""
    header = ['section', 'case', 'method', 'ms', 'ratio', 'note']
    cells = [[r.section, r.case, r.method, f"{r.ms:.2f}", f"{r.ratio:.2f}", r.note]
             for r in rows]
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        lines += ['| ' + ' | '.join(c.replace('|', r'\|') for c in row) + ' |' for row in cells]
        return '\n'.join(lines)
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in [header] + cells)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    selection = parser.add_argument_group('sections')
    selection.add_argument('--sections', nargs='+', default=list(SECTIONS), metavar='NAME',
                      help=f"sections to run, from {list(SECTIONS)}")
    selection.add_argument('--quick', action='store_true',
                      help='small shapes for a smoke run that takes seconds')
    timing = parser.add_argument_group('timing')
    timing.add_argument('--repeats', type=int, default=10,
                        help='timed runs per case (after 2 warm-up runs); the median is shown')
    system = parser.add_argument_group('system')
    system.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    system.add_argument('--threads', type=int, default=0,
                        help='CPU threads for torch (0 keeps the torch default)')
    output = parser.add_argument_group('output')
    output.add_argument('--markdown', type=Path, default=None, metavar='FILE',
                        help='also write the table as Markdown to FILE')
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 or positive, got {args.threads}")
    if args.markdown is not None and not args.markdown.parent.is_dir():
        parser.error(f"--markdown: folder {args.markdown.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        setup = describe_setup(device)
        print(setup)
        rows = []
        for name in args.sections:
            rows += SECTIONS[name](args, device)
    finally:
        torch.set_num_threads(default_threads)      # main() may run inside a test session
    if not rows:
        raise UserError("no section produced a timing; see the messages above")
    print(format_table(rows, markdown=False))
    if args.markdown is not None:
        sizes = 'quick sizes' if args.quick else 'full sizes'
        text = (f"{setup}; median of {args.repeats} runs, {sizes}.\n\n"
                f"{format_table(rows, markdown=True)}\n")
        write_atomic(args.markdown, text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == '__main__':
    run_main(main)
