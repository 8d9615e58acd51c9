"""Time the SVD meta-layer, the nearest orthogonal gradient and the trainers' steps.

Sections (``--sections``, default all):

* ``meta``: forward + backward of ZCANormBatch with each inverse-square-root backend against
  nn.BatchNorm2d, at 64 channels on 128x64x32x32 (the CIFAR stem of arXiv 2207.02119) and at
  256 and 512 channels. Ratios are relative to BatchNorm2d.
* ``nog``: models.orthogonality.nearest_orthogonal with each method against U V^T from
  torch.linalg.svd, at the pre-SVD gradient shapes 64x27 (CIFAR stem), 30x16384 and 6x524288
  (GAN layers). Ratios are relative to the torch.linalg.svd reference.
* ``train_step``: one CIFAR ResNet step with a BatchNorm2d stem, the ZCA stem, and the ZCA
  stem with NOG + OLR (and OW). Ratios are relative to the BatchNorm2d stem.
* ``trainers``: one step of each trainer (CIFAR ResNet with the ZCA stem, EigenGAN D + G,
  vanilla GAN D + G) in fp32 and under bf16 autocast, without and with NOG + OLR. The table
  gives time, images per second, peak memory and the share of the step spent in NOG + OLR.
  Ratios are relative to fp32 without NOG + OLR of the same trainer.

``--size full`` (the default) uses the published sizes: ResNet-50 at batch 128 on 32x32,
EigenGAN at 256 pixels and batch 64, the vanilla GAN at 128 pixels and batch 128. ``--quick``
and ``--size tiny`` shrink batch, resolution and width, and the table states the sizes used.
Each time is the median of ``--repeats`` timed runs after warm-up runs, synchronised on CUDA.
A new section is a function ``(args, device) -> list[Row]`` added to ``SECTIONS``.

Usage:
    python benchmarks/benchmark.py --device cuda --markdown gpu.md   # published sizes
    python benchmarks/benchmark.py --device cpu --threads 2 --quick --repeats 3
    python benchmarks/benchmark.py --size tiny --repeats 1            # smoke run in seconds
"""
import argparse
import math
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

from models.runs import HelpFormatter, UserError, run_main, select_device  # noqa: E402
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
    images_per_s: float = math.nan
    peak_mib: float = math.nan
    orth_share: float = math.nan
    memory_label: str = ''


def time_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
            warmup: int = 2) -> dict[str, float]:
    """Return the median wall time in milliseconds of each fn(), synchronised on CUDA.

    The functions run in turns (one call of each per round), so a change in machine load
    during the measurement affects all of them alike rather than whichever ran last.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bench_meta(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Forward + backward of ZCANormBatch per backend and of nn.BatchNorm2d."""
    if args.size != 'full':
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
        times = time_ms(steps, device, args.repeats, args.warmup)
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
    shapes = [(64, 27), (30, 1024), (6, 4096)] if args.size != 'full' else \
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
        times = time_ms(steps, device, args.repeats, args.warmup)
        expected = reference()
        ref_ms = times['torch.linalg.svd U V^T']
        for name, step in steps.items():
            note = ''
            if name != 'torch.linalg.svd U V^T':
                note = f"max |Q - U V^T| {(step() - expected).abs().max().item():.1e}"
            rows.append(Row('nog', f"{m}x{n}", name, times[name], times[name] / ref_ms, note))
    return rows


# Sizes of the trainer steps: 'full' is each trainer's published size, 'quick' runs on a CPU
# in a few minutes, 'tiny' in seconds (tests). simple_gan's 'model' is gan128 (128 pixels) or
# gan (64 pixels); width is its --width_mult.
TRAINER_SIZES = {
    'full': {'cifar': {'arch': 'resnet50', 'batch': 128, 'side': 32},
             'eigengan': {'size': 256, 'batch': 64, 'base_channels': 16, 'max_channels': 512,
                          'noise_dim': 512},
             'simple_gan': {'model': 'gan128', 'batch': 128, 'width': 1.0}},
    'quick': {'cifar': {'arch': 'resnet18', 'batch': 8, 'side': 16},
              'eigengan': {'size': 64, 'batch': 8, 'base_channels': 8, 'max_channels': 64,
                           'noise_dim': 64},
              'simple_gan': {'model': 'gan', 'batch': 8, 'width': 0.125}},
    'tiny': {'cifar': {'arch': 'resnet18', 'batch': 2, 'side': 8},
             'eigengan': {'size': 16, 'batch': 2, 'base_channels': 4, 'max_channels': 16,
                          'noise_dim': 16},
             'simple_gan': {'model': 'gan', 'batch': 2, 'width': 0.0625}},
}
TRAINERS = ('cifar', 'eigengan', 'simple_gan')
AMP_VARIANTS = ('off', 'bf16')


class TimedApply:
    """Wrap ``OrthogonalUpdate.apply`` so that each call's wall time is recorded.

    The device is synchronised before and after the call, so the time is that of NOG and OLR
    alone and not of the backward kernels still queued on a GPU.
    """

    def __init__(self, orth, device: torch.device):
        self.orth, self.device, self.ms = orth, device, []
        self.inner = orth.apply
        orth.apply = self

    def __call__(self, base_lr: float) -> bool:
        sync(self.device)
        start = time.perf_counter()
        go_ahead = self.inner(base_lr)
        sync(self.device)
        self.ms.append(1e3 * (time.perf_counter() - start))
        return go_ahead


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def cifar_step(sizes: dict, device: torch.device, amp: str, nog_olr: bool,
               norm: str = 'zcanormbatch', ow: bool = False):
    """Build a CIFAR ResNet step (forward, cross-entropy, backward, NOG/OLR, SGD).

    Returns ``(step, orth, images per step)``. The optimizer is SGD (lr 0.1, momentum 0.9,
    weight decay 5e-4) with the stem weight alone in its group, as main_cifar100.py builds it.
    """
    from models.amp import autocast, make_grad_scaler, step_optimizer
    from models.orthogonality import OrthogonalUpdate, split_param_groups
    from models.resnet import cifar_resnet

    batch = sizes['batch']
    model = cifar_resnet(sizes['arch'], 100, norm=norm, ow=ow).to(device).train()
    groups = split_param_groups(model.parameters(), [model.pre_svd_param])
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    orth = OrthogonalUpdate(optimizer, [model.pre_svd_param], nog=nog_olr, olr=nog_olr)
    scaler = make_grad_scaler(amp, device)
    generator = torch.Generator().manual_seed(0)
    side = sizes['side']
    images = torch.randn(batch, 3, side, side, generator=generator).to(device)
    labels = torch.randint(0, 100, (batch,), generator=generator).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        step_optimizer(optimizer, scaler, orth if nog_olr else None, base_lr=0.1)
        return loss.detach()

    return step, orth, batch


def eigengan_step(sizes: dict, device: torch.device, amp: str, nog_olr: bool):
    """Build one EigenGAN iteration: ``d_step`` and ``g_step`` of eigengan/trainer.py.

    The lazy R1 penalty (every 16 steps in the trainer) is left out. Real images are
    random values in [-1, 1]. Returns ``(step, orth, images per step)``.
    """
    from eigengan.state import build_state
    from eigengan.trainer import build_parser, d_step, g_step

    args = build_parser('benchmark', sizes['size']).parse_args([
        'unused-data-folder', '--batch', str(sizes['batch']), '--amp', amp,
        '--reg_type', 'nog_olr' if nog_olr else 'none',
        '--base_channels', str(sizes['base_channels']),
        '--max_channels', str(sizes['max_channels']), '--noise_dim', str(sizes['noise_dim'])])
    s = build_state(args, device)
    real_img = torch.rand(args.batch, 3, args.size, args.size).to(device) * 2 - 1

    def step():
        loss_D = d_step(args, s, real_img)[0]
        loss_G = g_step(args, s, args.batch, device)[0]
        return loss_D + loss_G

    return step, s.orth, args.batch


def simple_gan_step(sizes: dict, device: torch.device, amp: str, nog_olr: bool):
    """Build one vanilla GAN iteration: ``train_step`` of simple_gan/trainer.py.

    A step is a D update with the WGAN-GP penalty and a G update with NOG/OLR on the first
    layer. Returns ``(step, orth, images per step)``; ``orth`` is None without NOG/OLR.
    """
    from simple_gan.train import build_parser
    from simple_gan.trainer import build_training, train_step

    args = build_parser().parse_args([
        '--dataroot', 'unused-data-folder', '--model', sizes['model'],
        '--width_mult', str(sizes['width']), '--batch_size', str(sizes['batch']),
        '--amp', amp, '--reg_type', 'nog_olr' if nog_olr else 'none'])
    t = build_training(args, n_images=sizes['batch'], device=device)
    side = t.G.size
    real_img = torch.rand(args.batch_size, 3, side, side).to(device) * 2 - 1

    def step():
        record = train_step(t, real_img, args)
        return torch.tensor(record['loss_D'] + record['loss_G'])

    return step, t.orth, args.batch_size


STEP_BUILDERS = {'cifar': cifar_step, 'eigengan': eigengan_step, 'simple_gan': simple_gan_step}


def describe_sizes(trainer: str, sizes: dict) -> str:
    """Return the size actually used, e.g. 'ZCA resnet50, batch 128, 32x32'."""
    if trainer == 'cifar':
        return f"ZCA {sizes['arch']}, batch {sizes['batch']}, {sizes['side']}x{sizes['side']}"
    if trainer == 'eigengan':
        return (f"EigenGAN {sizes['size']}px, batch {sizes['batch']}, channels "
                f"{sizes['base_channels']}-{sizes['max_channels']}")
    side = 128 if sizes['model'] == 'gan128' else 64
    return f"{sizes['model']} {side}px, batch {sizes['batch']}, width {sizes['width']:g}"


def peak_memory_mib(step: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Return the peak memory of one call of step() in MiB, and what step() returned.

    CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated
    before it, so the weights (and other models built earlier) are not counted.
    CPU: the growth of the resident set size over the call, sampled every millisecond from
    /proc/self/statm by a thread, so a peak shorter than a millisecond can be missed.
    """
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, result
    return rss_growth_mib(step)


def resident_bytes() -> int:
    """Return the resident set size of this process (Linux /proc, else the peak from rusage)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        # ru_maxrss is in KiB on Linux and in bytes on macOS; only the growth is used.
        import resource
        scale = 1 if sys.platform == 'darwin' else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_growth_mib(step: Callable[[], object]) -> tuple[float, object]:
    """Return the sampled peak growth of the resident set size during step(), in MiB."""
    import threading

    before = resident_bytes()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            done.wait(1e-3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = step()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], resident_bytes())
    return (peak[0] - before) / 2 ** 20, result


def bench_trainers(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Time one training step of each trainer, fp32 and bf16, without and with NOG + OLR.

    Per trainer the variants run in turns (see ``time_ms``). Ratios are relative to the first
    ``--amp`` mode (fp32 by default) without NOG/OLR of the same trainer. The ``orth`` column is the median time of
    ``OrthogonalUpdate.apply`` (NOG and OLR, synchronised) as a share of the step.
    """
    memory_label = ('CUDA max_memory_allocated growth, 1st step' if device.type == 'cuda'
                    else 'CPU peak RSS growth, 1st step')
    rows = []
    for trainer in args.trainers:
        sizes = TRAINER_SIZES[args.size][trainer]
        steps, timers, first = {}, {}, {}
        for amp in args.amp:
            for nog_olr in (False, True):
                name = f"{'fp32' if amp == 'off' else amp} {'nog_olr' if nog_olr else 'baseline'}"
                torch.manual_seed(0)
                step, orth, batch = STEP_BUILDERS[trainer](sizes, device, amp, nog_olr)
                steps[name] = step
                timers[name] = TimedApply(orth, device) if nog_olr else None
                # Memory of the first step, which also allocates the gradients and the
                # optimizer state; the loss of that step shows that it was finite.
                first[name] = peak_memory_mib(step, device)
        times = time_ms(steps, device, args.repeats, args.warmup)
        reference = next(iter(times.values()))       # baseline of the first --amp mode
        for name, ms in times.items():
            memory, loss = first[name]
            orth_ms = math.nan
            if timers[name] is not None:
                orth_ms = statistics.median(timers[name].ms[-args.repeats:])
            rows.append(Row('trainers', describe_sizes(trainer, sizes), name, ms,
                            ms / reference, f"1st loss {float(loss):.3g}",
                            images_per_s=1e3 * batch / ms, peak_mib=memory,
                            orth_share=orth_ms / ms, memory_label=memory_label))
        del steps, timers, first
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


def bench_train_step(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Time one CIFAR training step per method against a batch-norm stem.

    A step is forward, cross-entropy, backward, NOG and OLR on the stem weight, and the SGD
    step (see ``cifar_step``), at the CIFAR size of ``--size``.
    """
    sizes = TRAINER_SIZES[args.size]['cifar']
    variants = {'BatchNorm2d stem': ('batchnorm', False, False),
                'ZCA baseline': ('zcanormbatch', False, False),
                'ZCA nog_olr': ('zcanormbatch', True, False),
                'ZCA nog_olr_ow': ('zcanormbatch', True, True)}
    steps = {}
    for name, (norm, nog_olr, ow) in variants.items():
        torch.manual_seed(0)
        steps[name] = cifar_step(sizes, device, 'off', nog_olr, norm=norm, ow=ow)[0]
    times = time_ms(steps, device, args.repeats, args.warmup)
    case = f"{sizes['arch']}, batch {sizes['batch']}, {sizes['side']}x{sizes['side']}"
    return [Row('train_step', case, name, ms, ms / times['BatchNorm2d stem'])
            for name, ms in times.items()]


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device], list[Row]]] = {
    'meta': bench_meta,
    'nog': bench_nog,
    'train_step': bench_train_step,
    'trainers': bench_trainers,
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


def format_number(value: float, digits: int) -> str:
    return '' if math.isnan(value) else f"{value:.{digits}f}"


def format_table(rows: list[Row], markdown: bool) -> str:
    """Format rows as a fixed-width text table or a Markdown table.

    The columns img/s, peak MiB (with what was measured) and orth % appear when a row has them.
    """
    header = ['section', 'case', 'method', 'ms', 'ratio']
    cells = [[r.section, r.case, r.method, f"{r.ms:.2f}", f"{r.ratio:.2f}"] for r in rows]
    if any(not math.isnan(r.images_per_s) for r in rows):
        header += ['img/s', 'peak MiB', 'memory measured as', 'orth %']
        for row, r in zip(cells, rows):
            row += [format_number(r.images_per_s, 1), format_number(r.peak_mib, 1),
                    r.memory_label, format_number(100 * r.orth_share, 2)]
    header.append('note')
    for row, r in zip(cells, rows):
        row.append(r.note)
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
                                     formatter_class=HelpFormatter)
    selection = parser.add_argument_group('sections')
    selection.add_argument('--sections', nargs='+', default=list(SECTIONS), metavar='NAME',
                      help=f"sections to run, from {list(SECTIONS)}")
    selection.add_argument('--size', choices=('full', 'quick', 'tiny'), default='full',
                           help="full: published sizes; quick: a CPU run of minutes; tiny: "
                                "seconds, for tests")
    selection.add_argument('--quick', dest='size', action='store_const', const='quick',
                           help='the same as --size quick')
    selection.add_argument('--trainers', nargs='+', choices=TRAINERS, default=list(TRAINERS),
                           metavar='NAME', help=f"trainers of the trainers section, from "
                                                f"{list(TRAINERS)}")
    selection.add_argument('--amp', nargs='+', choices=AMP_VARIANTS, default=list(AMP_VARIANTS),
                           help="precisions of the trainers section: off (fp32) and bf16 "
                                "autocast; the first is the reference of the ratios")
    timing = parser.add_argument_group('timing')
    timing.add_argument('--repeats', type=int, default=10,
                        help='timed runs per case; the median is shown')
    timing.add_argument('--warmup', type=int, default=2, help='untimed runs per case first')
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
    if len(set(args.amp)) != len(args.amp) or len(set(args.trainers)) != len(args.trainers):
        parser.error(f"--amp {args.amp} and --trainers {args.trainers} must not repeat a value")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or positive, got {args.warmup}")
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
        sizes = {'full': 'published sizes', 'quick': 'quick sizes',
                 'tiny': 'tiny sizes'}[args.size]
        text = (f"{setup}; median of {args.repeats} runs, {sizes}.\n\n"
                f"{format_table(rows, markdown=True)}\n")
        write_atomic(args.markdown, text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == '__main__':
    run_main(main)
