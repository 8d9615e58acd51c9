"""Tests of benchmarks/benchmark.py: each section runs at small sizes and fills its table."""
import math
import re

import pytest
import torch

from benchmarks import benchmark


def test_quick_meta_section_writes_markdown(tmp_path, capsys):
    out = tmp_path / 'table.md'
    threads = torch.get_num_threads()
    code = benchmark.main(['--quick', '--sections', 'meta', '--repeats', '1', '--threads', '1',
                           '--device', 'cpu', '--markdown', str(out)])
    assert code == 0
    assert torch.get_num_threads() == threads, "--threads was not restored after main()"
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith('| meta')]
    # Two shapes, each with BatchNorm2d and the three backends.
    assert len(rows) == 8, f"expected 8 meta rows, got {len(rows)}:\n{text}"
    for row in rows:
        ms, ratio = row.split(' | ')[3:5]
        assert float(ms) > 0, row
        if 'BatchNorm2d' in row:
            assert float(ratio) == 1.0, f"reference ratio is not 1: {row}"
    assert 'ZCA exact' in capsys.readouterr().out


def test_format_table_escapes_pipes():
    row = benchmark.Row('nog', '6x8', 'svd', 1.0, 1.0, 'max |Q - U V^T| 1e-7')
    last_line = benchmark.format_table([row], markdown=True).splitlines()[-1]
    separators = re.findall(r'(?<!\\)\|', last_line)
    assert len(separators) == 7, f"6 cells need 7 unescaped separators: {last_line}"


def test_unknown_section_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        benchmark.main(['--sections', 'train'])
    assert info.value.code == 2
    assert '--sections' in capsys.readouterr().err


def run_tiny(tmp_path, sections: list[str], extra: list[str] = ()) -> list[list[str]]:
    """Run sections at tiny sizes and return the cells of the Markdown table's data rows."""
    out = tmp_path / 'table.md'
    code = benchmark.main(['--size', 'tiny', '--sections', *sections, '--repeats', '1',
                           '--warmup', '0', '--threads', '1', '--device', 'cpu',
                           '--markdown', str(out), *extra])
    assert code == 0
    lines = [line for line in out.read_text().splitlines() if line.startswith('| ')][1:]
    return [[cell.strip() for cell in line.strip('|').split(' | ')] for line in lines]


def positive_finite(cell: str) -> bool:
    return math.isfinite(float(cell)) and float(cell) > 0


def test_trainers_section_rows_and_numbers(tmp_path):
    rows = run_tiny(tmp_path, ['trainers'])
    methods = ['fp32 baseline', 'fp32 nog_olr', 'bf16 baseline', 'bf16 nog_olr']
    assert [row[2] for row in rows] == methods * 3, f"unexpected methods {[r[2] for r in rows]}"
    cases = [row[1] for row in rows[::4]]
    # The table states the sizes used.
    assert cases[0].startswith('ZCA resnet18, batch 2, 8x8'), cases
    assert cases[1].startswith('EigenGAN 16px, batch 2'), cases
    assert cases[2].startswith('gan 64px, batch 2'), cases
    for section, case, method, ms, ratio, img_s, peak, label, orth, note in rows:
        assert positive_finite(ms), f"{case} {method}: ms {ms}"
        assert positive_finite(ratio), f"{case} {method}: ratio {ratio}"
        assert positive_finite(img_s), f"{case} {method}: images/s {img_s}"
        assert math.isfinite(float(peak)), f"{case} {method}: peak memory {peak}"
        assert float(peak) >= 0, f"{case} {method}: peak memory {peak}"
        assert label == 'CPU peak RSS growth, 1st step', label
        if 'nog_olr' in method:
            assert 0 < float(orth) < 100, f"{case} {method}: NOG+OLR share {orth} %"
        else:
            assert orth == '', f"{case} {method}: share {orth!r} without NOG+OLR"
        assert math.isfinite(float(note.split()[-1])), f"{case} {method}: {note}"
    assert all(float(row[4]) == 1.0 for row in rows[::4]), "fp32 baseline ratio is not 1"


def test_train_step_section_rows(tmp_path):
    rows = run_tiny(tmp_path, ['train_step'])
    assert [row[2] for row in rows] == ['BatchNorm2d stem', 'ZCA baseline', 'ZCA nog_olr',
                                        'ZCA nog_olr_ow'], rows
    for row in rows:
        assert positive_finite(row[3]), f"ms {row[3]}: {row}"
        assert positive_finite(row[4]), f"ratio {row[4]}: {row}"


def test_timed_apply_records_each_call():
    class Update:
        def apply(self, base_lr):
            return base_lr > 0

    update = Update()
    timer = benchmark.TimedApply(update, torch.device('cpu'))
    assert update.apply(0.1) is True
    assert update.apply(-1.0) is False
    assert len(timer.ms) == 2 and all(ms >= 0 for ms in timer.ms), timer.ms
