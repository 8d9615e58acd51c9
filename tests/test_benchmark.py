"""Smoke test of benchmarks/benchmark.py: the quick meta section runs and writes its table."""
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
