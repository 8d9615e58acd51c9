"""Tests of EigenGAN: model, losses, trainer (every --reg_type, NOG, OLR, resume), test.py."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eigengan import evaluate, model, trainer
from eigengan import test as eigengan_test
from eigengan.state import build_models, build_optimizers, build_state
from models.orthogonality import optimal_learning_rate
from models.runs import UserError, load_checkpoint, save_checkpoint
from test_images import make_image_folder
from tests.state_checks import assert_states_equal

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
# Tiny networks on 32-pixel images: 3 blocks with 3 basis vectors each.
TINY = ['--size', '32', '--batch', '3', '--n_basis', '3', '--noise_dim', '8',
        '--base_channels', '4', '--max_channels', '8', '--n_workers', '0', '--n_sample', '4',
        '--d_reg_every', '2', '--device', 'cpu']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    make_image_folder(root)
    return root


def train(data_dir, logdir, name, *extra):
    argv = [str(data_dir), *TINY, '--logdir', str(logdir), '--name', name, *extra]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the skipped broken files
        trainer.main(argv, size=256)
    return logdir / name


@pytest.fixture(scope='module')
def trained_run(data_dir, tmp_path_factory):
    # Module fixtures start before the one_thread fixture, so they set the thread count too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(data_dir, tmp_path_factory.mktemp('logs'), 'nog', '--steps', '2')
    finally:
        torch.set_num_threads(threads)


def parse(*extra):
    parser = trainer.build_parser('test', 256)
    args = parser.parse_args(['unused', *TINY, *extra])
    trainer.check_args(parser, args)
    return args


def test_subspace_layer_formula():
    torch.manual_seed(0)
    layer = model.SubspaceLayer(dim=20, n_basis=4)
    assert layer.L.tolist() == [12.0, 9.0, 6.0, 3.0], f'L = {layer.L.tolist()}'
    gram = layer.U @ layer.U.T
    err = (gram - torch.eye(4)).abs().max().item()
    assert err < 1e-5, f'U U^T differs from I by {err}'
    z = torch.randn(5, 4)
    expected = (layer.L * z) @ layer.U + layer.mu
    assert torch.allclose(layer(z), expected)


@pytest.mark.parametrize('size,n_blocks', [(32, 3), (128, 5), (256, 6)])
def test_generator_blocks_and_bases(size, n_blocks):
    G = model.Generator(size, n_basis=2, noise_dim=4, base_channels=1, max_channels=2)
    assert G.n_blocks == n_blocks, f'{G.n_blocks} blocks'
    dims = [U.shape for U in G.subspace_bases()]
    # U of block i has shape (n_basis, H*W*C_in) with H = W = 4 * 2^i.
    expected = [(2, (4 * 2 ** i) ** 2 * model.channels_at(4 * 2 ** i, size, 1, 2))
                for i in range(n_blocks)]
    assert [tuple(d) for d in dims] == expected, f'{dims}'


def test_generator_and_discriminator_shapes():
    G = model.Generator(32, n_basis=3, noise_dim=8, base_channels=4, max_channels=8)
    D = model.Discriminator(32, base_channels=4, max_channels=8)
    x = G(torch.randn(2, 3, 3), torch.randn(2, 8))
    assert x.shape == (2, 3, 32, 32), f'{tuple(x.shape)}'
    assert x.abs().max() <= 1
    assert D(x).shape == (2,)


def test_lsgan_uses_squared_residuals():
    real, gen = torch.tensor([3.0]), torch.tensor([2.0])
    assert model.d_loss('lsgan', real, gen).item() == pytest.approx((3 - 1) ** 2 + 2 ** 2)
    assert model.g_loss('lsgan', gen).item() == pytest.approx((2 - 1) ** 2)


def test_hinge_and_non_saturating_values():
    real, gen = torch.tensor([0.5]), torch.tensor([-0.25])
    assert model.d_loss('hinge', real, gen).item() == pytest.approx(0.5 + 0.75)
    assert model.g_loss('hinge', gen).item() == pytest.approx(0.25)
    expected = np.log1p(np.exp(-0.5)) + np.log1p(np.exp(-0.25))
    assert model.d_loss('non_saturating', real, gen).item() == pytest.approx(expected)


def test_orthogonality_penalty_zero_for_orthonormal():
    U = torch.linalg.qr(torch.randn(10, 3))[0].T  # (3, 10), orthonormal rows
    assert model.orthogonality_penalty([U]).item() < 1e-10
    # (2U)(2U)^T - I = 3I: three squared entries of 9 averaged over 9 entries.
    assert model.orthogonality_penalty([2 * U]).item() == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize('reg_type', trainer.REG_TYPES)
def test_each_reg_type_trains(data_dir, tmp_path, reg_type):
    run = train(data_dir, tmp_path, reg_type, '--reg_type', reg_type, '--steps', '2',
                '--sample_every', '1', '--ckpt_every', '2')
    assert (run / 'samples' / '0000001.png').is_file()
    assert (run / 'samples' / '0000002.png').is_file()
    state = torch.load(run / 'checkpoints' / '0000002.pt', weights_only=True)
    assert state['step'] == 2
    assert (run / 'checkpoints' / 'last.pt').is_file()
    records = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2]
    assert all(f'orth_error/U{i}' in records[-1] for i in range(3)), records[-1]
    assert ('olr_eta/U0' in records[-1]) == ('olr' in reg_type), records[-1]
    assert (records[-1]['loss_ol'] > 0) == (reg_type == 'ol'), records[-1]['loss_ol']
    config = json.loads((run / 'config.json').read_text())
    assert config['method'] == trainer.METHOD_NAMES[reg_type]


def test_nog_gives_orthonormal_gradients():
    torch.manual_seed(0)
    args = parse('--reg_type', 'nog', '--batch', '4')
    s = build_state(args, torch.device('cpu'))
    trainer.g_step(args, s, args.batch, torch.device('cpu'))
    for i, U in enumerate(s.G.subspace_bases()):
        gram = U.grad @ U.grad.T
        err = (gram - torch.eye(3)).abs().max().item()
        assert err < 1e-4, f'U{i}: gradient rows differ from orthonormal by {err}'


def test_olr_groups_and_learning_rates():
    torch.manual_seed(0)
    args = parse('--reg_type', 'olr', '--batch', '4', '--lr', '10')
    G, D, _ = build_models(args, torch.device('cpu'))
    g_optim, _, orth = build_optimizers(args, G, D)
    bases = G.subspace_bases()
    for U, group in zip(bases, g_optim.param_groups[1:]):
        assert len(group['params']) == 1, f"group of {len(group['params'])} parameters"
        assert group['params'][0] is U, 'each U needs its own group'
    loss = model.g_loss('hinge', D(G(*trainer.sample_latents(G, 4, 'cpu'))))
    loss.backward()
    # Gradients aligned with U put eta* = 1/3 in range; the opposite sign puts it out of range.
    for sign, U in zip((1.0, -1.0, 1.0), bases):
        U.grad = sign * U.detach() + 0.01 * torch.randn_like(U)
    expected = [optimal_learning_rate(U, U.grad, args.lr) for U in bases]
    assert [used for _, used in expected] == [True, False, True], f'{expected}'
    assert orth.apply(args.lr)
    for i, ((eta, _), group) in enumerate(zip(expected, g_optim.param_groups[1:])):
        assert group['lr'] == eta, f'U{i}: lr {group["lr"]} vs eta* {eta}'
    assert g_optim.param_groups[2]['lr'] == args.lr
    assert abs(g_optim.param_groups[1]['lr'] - 1 / 3) < 0.01, g_optim.param_groups[1]['lr']
    assert g_optim.param_groups[0]['lr'] == args.lr, 'OLR must leave the other group alone'


def test_resume_is_exact(data_dir, tmp_path):
    # Batch 3 of 10 images: the resume at step 2 falls inside an epoch; R1 runs at steps 0, 2.
    common = ('--reg_type', 'nog_olr', '--ckpt_every', '100')
    straight = train(data_dir, tmp_path, 'straight', *common, '--steps', '4')
    halves = train(data_dir, tmp_path, 'halves', *common, '--steps', '2')
    train(data_dir, tmp_path, 'halves', *common, '--steps', '4',
          '--ckpt', str(halves / 'checkpoints' / 'last.pt'))
    a = load_checkpoint(straight / 'checkpoints' / 'last.pt')
    b = load_checkpoint(halves / 'checkpoints' / 'last.pt')
    assert a['step'] == b['step'] == 4
    for key in ('G', 'D', 'G_ema', 'g_optim', 'd_optim', 'orth_update', 'rng'):
        assert_states_equal(a[key], b[key], key)
    steps = [json.loads(line)['step'] for line in (halves / 'stats.jsonl').read_text().splitlines()]
    assert steps == [1, 2, 3, 4], f'stats.jsonl steps {steps}'


def test_existing_run_needs_ckpt(trained_run, data_dir):
    with pytest.raises(UserError, match='--ckpt'):
        train(data_dir, trained_run.parent, trained_run.name, '--steps', '2')


def test_resume_with_other_architecture(trained_run, data_dir):
    with pytest.raises(UserError, match='flags build'):
        train(data_dir, trained_run.parent, trained_run.name, '--steps', '3', '--n_basis', '2',
              '--ckpt', str(trained_run / 'checkpoints' / 'last.pt'))


def test_wrong_or_finished_checkpoint_changes_nothing(trained_run, data_dir, tmp_path,
                                                       capsys):
    files = {p: p.read_bytes() for p in trained_run.rglob('*') if p.is_file()}
    last = trained_run / 'checkpoints' / 'last.pt'
    step = load_checkpoint(last)['step']
    with pytest.raises(UserError, match='flags build'):
        train(data_dir, trained_run.parent, trained_run.name, '--steps', str(step + 1),
              '--n_basis', '2', '--ckpt', str(last))
    damaged = tmp_path / 'damaged.pt'
    damaged.write_bytes(last.read_bytes()[:200])
    with pytest.raises(UserError, match='corrupted'):
        train(data_dir, trained_run.parent, trained_run.name, '--steps', str(step + 1),
              '--ckpt', str(damaged))
    capsys.readouterr()
    train(data_dir, trained_run.parent, trained_run.name, '--steps', str(step), '--ckpt',
          str(last))
    assert 'training is finished' in capsys.readouterr().out
    after = {p: p.read_bytes() for p in trained_run.rglob('*') if p.is_file()}
    assert after == files, 'the run folder changed'


def test_missing_data_folder(tmp_path):
    with pytest.raises(UserError, match='not found'):
        train(tmp_path / 'absent', tmp_path, 'x', '--steps', '1')


def test_empty_data_folder(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='no readable images'):
        train(tmp_path / 'empty', tmp_path, 'x', '--steps', '1')
    assert not (tmp_path / 'x').exists(), 'a run folder was created for a bad dataset'


def test_fid_without_weights_leaves_nothing(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    with pytest.raises(UserError, match='pt_inception'):
        train(data_dir, tmp_path, 'x', '--steps', '1', '--fid')
    assert not (tmp_path / 'x').exists(), 'a run folder was created before the error'


def test_traverse_writes_expected_files(trained_run, tmp_path):
    out = tmp_path / 'eval'
    eigengan_test.main([str(trained_run / 'checkpoints' / 'last.pt'), '--traverse', '--out',
                        str(out), '--n_rows', '2', '--n_steps', '3', '--n_sample', '4',
                        '--device', 'cpu'])
    with Image.open(out / 'samples.png') as img:
        assert img.size == (2 * 34 + 2, 2 * 34 + 2), f'samples.png {img.size}'
    names = sorted(p.name for p in (out / 'traverse').iterdir())
    assert names == sorted(f'layer{l}_dim{d}.png' for l in range(3) for d in range(3)), names
    with Image.open(out / 'traverse' / 'layer2_dim1.png') as img:
        assert img.size == (3 * 34 + 2, 2 * 34 + 2), f'traversal {img.size}'


def test_vp_pairs_labels_and_regeneration(trained_run, tmp_path):
    out = tmp_path / 'vp'
    ckpt = trained_run / 'checkpoints' / 'last.pt'
    eigengan_test.main([str(ckpt), '--evaluate_VP', '--n_pairs', '5', '--batch', '2', '--out',
                        str(out), '--device', 'cpu'])
    labels = np.load(out / 'labels.npy')
    assert labels.shape == (5, 9), f'labels shape {labels.shape}'
    assert labels.dtype == np.float32, f'labels dtype {labels.dtype}'
    assert ((labels != 0).sum(axis=1) == 1).all(), f'non-zero entries per row: {labels}'
    assert np.abs(labels).max() <= 8.0, f'codes outside U[-4, 4]: {np.abs(labels).max()}'
    codes = np.load(out / 'codes.npz')
    G = evaluate.load_generator(ckpt, 'cpu')
    img1, img2 = evaluate.regenerate_pairs(G, codes['z1'][3:4], codes['z2'][3:4],
                                           codes['noise'][3:4], 'cpu')
    pair = torch.cat([img1, img2], dim=3)[0]  # (3, H, 2W)
    pixels = ((pair.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    saved = np.asarray(Image.open(out / '000003.png'), dtype=np.float64)
    diff = np.abs(pixels - saved).max()
    assert diff <= 1, f'regenerated pair differs from the saved PNG by {diff} levels'


def test_wrong_architecture_checkpoint(trained_run, tmp_path):
    state = load_checkpoint(trained_run / 'checkpoints' / 'last.pt')
    state['arch']['n_basis'] = 5
    bad = tmp_path / 'bad.pt'
    save_checkpoint(bad, state)
    with pytest.raises(UserError, match='do not fit'):
        evaluate.load_generator(bad, 'cpu')
    save_checkpoint(bad, {'model': {'weight': torch.zeros(2)}})
    with pytest.raises(UserError, match='not an EigenGAN checkpoint'):
        eigengan_test.main([str(bad), '--traverse', '--out', str(tmp_path / 'o')])


def test_missing_metric_weights(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    ckpt = str(trained_run / 'checkpoints' / 'last.pt')
    with pytest.raises(UserError, match='vgg16-397923af.pth'):
        eigengan_test.main([ckpt, '--evaluate_PPL', '--device', 'cpu'])
    eigengan_test.main([ckpt, '--evaluate_FID', '--evaluate_PPL', '--skip_missing_weights',
                        '--device', 'cpu'])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(':')[0] for line in lines] == ['FID', 'PPL'], lines
    assert all('skipped' in line for line in lines), lines
    assert not (trained_run / 'metrics.json').exists(), 'a skipped metric was written'


def test_ppl_helpers():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    mid = evaluate.slerp(a, b, torch.tensor([0.5]))
    assert torch.allclose(mid, torch.tensor([[2 ** -0.5, 2 ** -0.5]]), atol=1e-6), mid
    values = np.concatenate([np.full(98, 1.0), [1000.0, -1000.0]])
    assert evaluate.trimmed_mean(values) == pytest.approx(1.0)


def test_published_command_from_eigengan_folder(data_dir, tmp_path):
    # The published command line, run from eigengan/ as a script (one dry-run step).
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    command = [sys.executable, 'train_animeface.py', str(data_dir), '--size', '32', '--batch',
               '3', '--reg_type', 'nog', '--name', 'anime_nog', '--logdir', str(tmp_path),
               '--base_channels', '4', '--max_channels', '8', '--noise_dim', '8',
               '--n_workers', '0', '--dry_run']
    result = subprocess.run(command, cwd=REPO / 'eigengan', env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # A dry run writes its run folder into a temporary directory and removes it.
    assert 'dry run: one step ran' in result.stdout, result.stdout[-2000:]
    assert not (tmp_path / 'anime_nog').exists(), 'the dry run left a run folder'
