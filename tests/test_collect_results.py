"""Tests of collect_results.py on run folders written into tmp_path."""
import json
from pathlib import Path

import pytest

import collect_results
from models.runs import UserError


def write_run(folder: Path, family: str, dataset: str, method: str, seed: int,
              epochs: list[dict] | None = None, metrics: dict | None = None,
              options: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    config = {'family': family, 'dataset': dataset, 'method': method, 'seed': seed,
              'options': options or {}}
    (folder / 'config.json').write_text(json.dumps(config))
    if epochs is not None:
        (folder / 'stats.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in epochs))
    if metrics is not None:
        (folder / 'metrics.json').write_text(json.dumps(metrics))
    return folder


def digits_epochs(errors: list[float], kappas: list[float]) -> list[dict]:
    return [{'epoch': epoch, 'test_error': error, 'test_acc': 100 - error, 'kappa': kappa,
             'kappa_raw': kappa * 10, 'rank': 9}
            for epoch, (error, kappa) in enumerate(zip(errors, kappas), start=1)]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    options = {'arch': 'resnet18', 'norm': 'zcanormbatch'}
    folders = [
        # Listed out of the table's method order on purpose.
        write_run(tmp_path / 'nog_s0', 'cifar', 'digits', 'nog', 0,
                  digits_epochs([30, 20, 15], [1e4, 1e3, 1e3]), options=options),
        write_run(tmp_path / 'base_s0', 'cifar', 'digits', 'baseline', 0,
                  digits_epochs([40, 20, 10], [1e5, 1e6, 1e5]), options=options),
        write_run(tmp_path / 'base_s1', 'cifar', 'digits', 'baseline', 1,
                  digits_epochs([40, 25, 12], [1e5, 1e6, 3e5]), options=options),
        write_run(tmp_path / 'gan_nog', 'simple_gan', 'celeba', 'nog', 0, metrics={
            'fid': {'value': 20.5, 'settings': {}}, 'vp_mean': {'value': 45.0, 'settings': {}},
            'vp_std': {'value': 1.5, 'settings': {}}}),
        write_run(tmp_path / 'gan_base', 'simple_gan', 'celeba', 'baseline', 0,
                  metrics={'fid': {'value': 25.25, 'settings': {}}}),
    ]
    # A resumed run logs epoch 3 again, and the later record must win.
    with open(tmp_path / 'base_s1' / 'stats.jsonl', 'a') as file:
        file.write(json.dumps(digits_epochs([40, 25, 14], [1e5, 1e6, 3e5])[2]) + '\n')
    (tmp_path / 'notes').mkdir()
    return [*folders, tmp_path / 'notes']


def table_rows(table: str) -> dict[str, list[str]]:
    """Map 'dataset/method' to the cells of its row."""
    rows, dataset = {}, None
    for line in table.splitlines():
        if line.startswith('### '):
            dataset = line.split()[1]
        elif line.startswith('| ') and not line.startswith('| method'):
            cells = [cell.strip() for cell in line.strip('|').split('|')]
            rows[f"{dataset}/{cells[0]}"] = cells[1:]
    return rows


def test_table_cifar_and_gan(runs, tmp_path, capsys):
    out = tmp_path / 'table.md'
    assert collect_results.main([*map(str, runs), '--out', str(out)]) == 0
    captured = capsys.readouterr()
    table = out.read_text()
    rows = table_rows(table)
    # Mean ± population std of the last epoch over two seeds (10 and 14).
    assert rows['digits/baseline'] == ['2', '3', '12.00 ± 2.00', '2.00e+05 ± 1.00e+05'], rows
    assert rows['digits/nog'] == ['1', '3', '15.00', '1.00e+03'], rows
    assert rows['celeba/nog'] == ['1', '20.50', '–', '45.00 ± 1.50'], rows
    assert rows['celeba/baseline'] == ['1', '25.25', '–', '–'], rows
    order = [key for key in rows if key.startswith('digits/')]
    assert order == ['digits/baseline', 'digits/nog'], f"row order {order}"
    assert '### digits (cifar, arch resnet18, norm zcanormbatch)' in table, table
    assert captured.err.count('warning') == 1, captured.err
    assert 'notes' in captured.err, captured.err
    assert table in captured.out


def test_table_kappa_raw(runs, tmp_path, capsys):
    # A rank-deficient covariance without eps is logged with kappa_raw 'inf'.
    epochs = digits_epochs([30, 20], [1e3, 1e3])
    epochs[-1]['kappa_raw'] = 'inf'
    olr = write_run(tmp_path / 'olr_s0', 'cifar', 'digits', 'olr', 0, epochs,
                    options={'arch': 'resnet18', 'norm': 'zcanormbatch'})
    collect_results.main([*map(str, runs[:3]), str(olr), '--kappa_key', 'kappa_raw'])
    rows = table_rows(capsys.readouterr().out)
    assert rows['digits/nog'][-1] == '1.00e+04', rows
    assert rows['digits/olr'][-1] == '–', rows


def test_plot_one_line_per_method(runs, tmp_path):
    groups = collect_results.group_runs(collect_results.find_runs(runs[:3]))
    fig = collect_results.plot_curves(groups, 'kappa', 'kappa', log=True, title='t')
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert labels == ['baseline', 'NOG'], f"lines {labels}"
    # The baseline curve is the geometric mean of the two seeds: sqrt(1e5 * 3e5) at epoch 3.
    y = ax.lines[0].get_ydata()
    assert y[2] == pytest.approx((1e5 * 3e5) ** 0.5, rel=1e-9), f"baseline curve {y}"
    assert ax.get_yscale() == 'log'
    assert ax.get_xlabel() == 'epoch', ax.get_xlabel()

    kappa_png, acc_png = tmp_path / 'kappa.png', tmp_path / 'acc.png'
    collect_results.main([*map(str, runs), '--plot_kappa', str(kappa_png),
                          '--plot_acc', str(acc_png)])
    for path in (kappa_png, acc_png):
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f"{path} is not a PNG"


def test_missing_path_error(tmp_path):
    with pytest.raises(UserError, match='not found'):
        collect_results.main([str(tmp_path / 'absent')])


def test_no_run_folders_error(tmp_path):
    with pytest.raises(UserError, match='config.json'):
        collect_results.main([str(tmp_path)])
