"""Collect run folders into one Markdown results table and, optionally, training-curve figures.

Reads each run folder's config.json (family, dataset, method, seed, options), stats.jsonl (the
CIFAR trainer's one record per epoch) and metrics.json (fid, ppl, vp_mean, vp_std, as merged
by eigengan/test.py, vp_score.py and the FID step of the shell scripts). The table has one
block per dataset (and per architecture, norm or model when runs differ in those), one row per
method, and the mean ± std over seeds:
    decorrelated batch norm (CIFAR, digits): test error of the last epoch, last kappa
    GANs: FID, PPL, VP score

Usage:
    python collect_results.py runs/*
    python collect_results.py runs/* --out results.md
    python collect_results.py runs/kappa_digits/* --plot_kappa docs/images/kappa_digits.png \\
        --plot_acc docs/images/acc_digits.png
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from models.runs import HelpFormatter, UserError, run_main

METHOD_ORDER = ('baseline', 'nog', 'olr', 'nog_olr', 'ow', 'nog_ow', 'olr_ow', 'nog_olr_ow',
                'ol', 'orojar', 'hp')
# Options that change what a number means, so runs that differ in them get separate blocks.
BLOCK_OPTIONS = ('arch', 'norm', 'model')
MISSING = '–'


@dataclass
class Run:
    """One run folder: its config.json fields, its per-epoch records and its metrics."""
    path: Path
    family: str
    dataset: str
    method: str
    seed: int | None
    options: dict
    epochs: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    @property
    def block(self) -> tuple[str, ...]:
        details = [f"{key} {self.options[key]}" for key in BLOCK_OPTIONS if key in self.options]
        return (self.dataset, self.family, *details)

    @property
    def is_gan(self) -> bool:
        return self.family != 'cifar'


# ---------------------------------------------------------------------------------------------
# Reading run folders
# ---------------------------------------------------------------------------------------------

def as_float(value) -> float | None:
    """Turn a logged value into a finite float, or None (missing, None, nan or inf)."""
    if isinstance(value, dict):
        value = value.get('value')
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # also reads the strings 'nan' and 'inf' of the JSON writers
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_stats(path: Path) -> list[dict]:
    """Read stats.jsonl: one record per epoch, sorted, the last record kept for each epoch.

    A resumed run logs again the epochs after its checkpoint, so later records win. A line
    that is not JSON (a run killed while writing) is skipped with a warning.
    """
    by_epoch: dict[int, dict] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get('epoch'), int):
            by_epoch[record['epoch']] = record
    if bad:
        print(f"warning: {path}: skipped {bad} line(s) that are not JSON", file=sys.stderr)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or move the file") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} does not contain a JSON object; fix or move the file")
    return data


def load_run(folder: Path) -> Run:
    """Read one run folder, which must contain config.json."""
    config = _read_json(folder / 'config.json')
    missing = [key for key in ('family', 'dataset', 'method') if key not in config]
    if missing:
        raise UserError(f"{folder / 'config.json'} lacks {', '.join(missing)}; it was not "
                        f"written by a trainer of this repository")
    run = Run(folder, str(config['family']), str(config['dataset']), str(config['method']),
              config.get('seed'), config.get('options') or {})
    if (folder / 'stats.jsonl').is_file():
        run.epochs = read_stats(folder / 'stats.jsonl')
    if (folder / 'metrics.json').is_file():
        run.metrics = _read_json(folder / 'metrics.json')
    return run


def find_runs(paths: list[Path]) -> list[Run]:
    """Load every run folder in ``paths``, skipping folders without config.json with one warning.

    A path that does not exist, or is not a folder, raises ``UserError``.
    """
    runs, skipped = [], []
    for path in paths:
        if not path.exists():
            raise UserError(f"run folder {path} not found")
        if not path.is_dir():
            raise UserError(f"{path} is not a folder; pass run folders (those with config.json)")
        if (path / 'config.json').is_file():
            runs.append(load_run(path))
        else:
            skipped.append(str(path))
    if skipped:
        print(f"warning: skipped {len(skipped)} folder(s) without config.json: "
              f"{', '.join(skipped)}", file=sys.stderr)
    return runs


def group_runs(runs: list[Run]) -> dict[tuple[str, ...], dict[str, list[Run]]]:
    """Group runs by block, then by method. Blocks are sorted and methods follow METHOD_ORDER."""
    groups: dict[tuple[str, ...], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.block][run.method].append(run)
    order = {method: index for index, method in enumerate(METHOD_ORDER)}
    result = {}
    for block in sorted(groups):
        methods = sorted(groups[block], key=lambda m: (order.get(m, len(order)), m))
        result[block] = {method: sorted(groups[block][method], key=lambda r: str(r.seed))
                         for method in methods}
        for method, method_runs in result[block].items():
            seeds = [run.seed for run in method_runs]
            if len(set(seeds)) < len(seeds):
                print(f"warning: {block[0]} {method}: several runs share a seed ({seeds}); "
                      f"all are averaged", file=sys.stderr)
    return result


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def format_mean_std(values: list[float | None], spec: str, seeds: int) -> str:
    """Format 'mean ± std' (population std) of the values present, e.g. '12.30 ± 0.45'.

    One value prints alone. When only some of the ``seeds`` runs have the value, the count
    follows, e.g. '12.30 (1 of 2)'.
    """
    present = [value for value in values if value is not None]
    if not present:
        return MISSING
    text = f"{np.mean(present):{spec}}"
    if len(present) > 1:
        text += f" ± {np.std(present):{spec}}"
    if len(present) < seeds:
        text += f" ({len(present)} of {seeds})"
    return text


def last_value(run: Run, key: str) -> float | None:
    """Return ``key`` of the last epoch record, or None when the run logged no epoch."""
    return as_float(run.epochs[-1].get(key)) if run.epochs else None


def last_test_error(run: Run) -> float | None:
    error = last_value(run, 'test_error')
    if error is None and last_value(run, 'test_acc') is not None:
        error = 100.0 - last_value(run, 'test_acc')
    return error


def vp_cell(runs: list[Run]) -> str:
    """VP score in percent: over training seeds, or vp_mean ± vp_std of a single seed."""
    means = [as_float(run.metrics.get('vp_mean')) for run in runs]
    if len(runs) == 1 and means[0] is not None:
        std = as_float(runs[0].metrics.get('vp_std'))
        return f"{means[0]:.2f}" + (f" ± {std:.2f}" if std is not None else '')
    return format_mean_std(means, '.2f', len(runs))


def epochs_cell(runs: list[Run]) -> str:
    counts = sorted({len(run.epochs) for run in runs})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def block_table(block: tuple[str, ...], methods: dict[str, list[Run]], kappa_key: str) -> str:
    """Return one block of the results table: a heading and a Markdown table."""
    dataset, family, *details = block
    lines = [f"### {dataset} ({', '.join([family, *details])})", '']
    gan = any(run.is_gan for runs in methods.values() for run in runs)
    if gan:
        lines += ['| method | seeds | FID | PPL | VP (%) |', '|---|---:|---:|---:|---:|']
    else:
        lines += [f'| method | seeds | epochs | test error (%) | final {kappa_key} |',
                  '|---|---:|---:|---:|---:|']
    for method, runs in methods.items():
        n = len(runs)
        if gan:
            fid = format_mean_std([as_float(r.metrics.get('fid')) for r in runs], '.2f', n)
            ppl = format_mean_std([as_float(r.metrics.get('ppl')) for r in runs], '.1f', n)
            cells = [fid, ppl, vp_cell(runs)]
        else:
            error = format_mean_std([last_test_error(r) for r in runs], '.2f', n)
            kappa = format_mean_std([last_value(r, kappa_key) for r in runs], '.2e', n)
            cells = [epochs_cell(runs), error, kappa]
        lines.append(f"| {method} | {n} | {' | '.join(cells)} |")
    return '\n'.join(lines)


def results_markdown(groups: dict[tuple[str, ...], dict[str, list[Run]]], kappa_key: str) -> str:
    """Return the whole table: one block per dataset, then what the numbers are."""
    blocks = [block_table(block, methods, kappa_key) for block, methods in groups.items()]
    runs = [run for methods in groups.values() for runs in methods.values() for run in runs]
    notes = ["± is the population standard deviation over training seeds."]
    if any(not run.is_gan for run in runs):
        notes.append(f"Test error and {kappa_key} are those of each run's last logged epoch.")
    if any(run.is_gan for run in runs):
        notes.append("VP is the best test top-1 accuracy of the VP classifier. For a single "
                     "seed, ± is the std over its classifier runs.")
    return '\n\n'.join([*blocks, ' '.join(notes)]) + '\n'


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def display_name(method: str) -> str:
    """Legend name of a method, e.g. 'nog_olr_ow' -> 'NOG+OLR+OW'."""
    return method if method == 'baseline' else method.upper().replace('_', '+')


def mean_curve(runs: list[Run], key: str, geometric: bool) -> tuple[list[int], list[float]]:
    """Average ``key`` per epoch over the runs that logged it (geometric mean if asked)."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for record in run.epochs:
            value = as_float(record.get(key))
            if value is not None and (value > 0 or not geometric):
                values[record['epoch']].append(math.log10(value) if geometric else value)
    epochs = sorted(values)
    means = [float(np.mean(values[epoch])) for epoch in epochs]
    return epochs, [10 ** m for m in means] if geometric else means


def epoch_label(groups: dict[tuple[str, ...], dict[str, list[Run]]]) -> str:
    """X-axis label, saying so when the trainer's --max_batches shortened every epoch."""
    limits = {run.options.get('max_batches') or 0
              for methods in groups.values() for runs in methods.values() for run in runs}
    if len(limits) == 1 and min(limits) > 0:
        return f"epoch (shortened to {min(limits)} batches by --max_batches)"
    return 'epoch'


def plot_curves(groups: dict[tuple[str, ...], dict[str, list[Run]]], key: str, ylabel: str,
                log: bool, title: str) -> Figure:
    """Draw ``key`` over epochs, one line per method (and block), averaged over seeds."""
    fig = Figure(figsize=(6.4, 4.2), layout='constrained')
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {method: f"C{index % 10}" for index, method in enumerate(METHOD_ORDER)}
    for block, methods in groups.items():
        for method, runs in methods.items():
            epochs, values = mean_curve(runs, key, geometric=log)
            if not epochs:
                continue
            label = display_name(method) + (f" ({block[0]})" if len(groups) > 1 else '')
            ax.plot(epochs, values, marker='o', markersize=3, label=label,
                    color=colors.get(method), linestyle='--' if 'ow' in method else '-')
    if log:
        ax.set_yscale('log')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(epoch_label(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which='major', alpha=0.3)
    if ax.lines:
        ax.legend(fontsize='small')
    return fig


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    # mkstemp creates the file with mode 0600, so give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, 'wb') as file:
            file.write(data)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_figure(fig: Figure, path: Path, key: str) -> None:
    if not fig.axes[0].lines:
        print(f"warning: no run has a finite {key} in stats.jsonl, so {path} has no curves",
              file=sys.stderr)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip('.') or 'png', dpi=150)
    write_bytes_atomic(path, buffer.getvalue())
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('run_dirs', type=Path, nargs='+',
                        help="run folders (each with config.json); others are skipped")
    parser.add_argument('--out', type=Path, default=None,
                        help="also write the Markdown table to this file")
    parser.add_argument('--kappa_key', choices=('kappa', 'kappa_raw'), default='kappa',
                        help="condition number for the table and --plot_kappa: kappa of the "
                             "covariance with eps on its diagonal, or kappa_raw without eps "
                             "(set by round-off when the covariance is rank deficient, and "
                             "logged as inf when its smallest eigenvalue is not positive; "
                             "such epochs are left out)")
    parser.add_argument('--plot_kappa', type=Path, default=None,
                        help="draw the covariance condition number over training (log scale, "
                             "geometric mean over seeds) to this image file")
    parser.add_argument('--plot_acc', type=Path, default=None,
                        help="draw the test accuracy (%%) over training (mean over seeds) to "
                             "this image file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = find_runs(args.run_dirs)
    if not runs:
        raise UserError("none of the given folders contains config.json; pass run folders")
    groups = group_runs(runs)

    table = results_markdown(groups, args.kappa_key)
    print(table, end='')
    if args.out is not None:
        write_bytes_atomic(args.out, table.encode())
        print(f"wrote {args.out}")

    curve_groups = {block: methods for block, methods in groups.items()
                    if any(run.epochs for runs in methods.values() for run in runs)}
    if args.plot_kappa is not None:
        label = 'κ = λmax / λmin' + (' (without eps)' if args.kappa_key == 'kappa_raw' else '')
        fig = plot_curves(curve_groups, args.kappa_key, label, log=True,
                          title='covariance condition number of the SVD meta-layer')
        save_figure(fig, args.plot_kappa, args.kappa_key)
    if args.plot_acc is not None:
        fig = plot_curves(curve_groups, 'test_acc', 'test accuracy (%)', log=False,
                          title='test accuracy')
        save_figure(fig, args.plot_acc, 'test_acc')
    return 0


if __name__ == '__main__':
    run_main(main)
