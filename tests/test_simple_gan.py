"""Tests of the vanilla GAN: networks, regularisers, NOG/OLR on the first layer, training,
resume, SIGTERM and SeFa. Everything runs on the CPU with tiny networks (--width_mult 1/64)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.orthogonality import optimal_learning_rate
from models.runs import load_checkpoint
from simple_gan import train
from simple_gan.networks import Discriminator, Generator, sefa_directions, sefa_rotated
from simple_gan.regularizers import hessian_penalty, orojar_penalty
from simple_gan.trainer import REG_TYPES, build_training, generator_step
from tests.state_checks import assert_states_equal

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
TINY = ['--model', 'gan', '--width_mult', '0.015625', '--nz', '8', '--device', 'cpu',
        '--batch_size', '4', '--print_freq', '1', '--display_freq', '100']


def write_faces(folder: Path, n: int = 8, size=(218, 178)) -> Path:
    """Synthetic aligned-CelebA-like JPEGs: a coloured ellipse on a plain background."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for i in range(n):
        img = np.full((*size, 3), rng.integers(0, 255, 3), np.uint8)
        face = ((yy - size[0] / 2) / 60) ** 2 + ((xx - size[1] / 2) / 45) ** 2 < 1
        img[face] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(folder / f'{i:03d}.jpg')
    return folder


@pytest.fixture(scope='module')
def faces(tmp_path_factory) -> Path:
    return write_faces(tmp_path_factory.mktemp('data') / 'faces')


@pytest.fixture(scope='module')
def church_lmdb(tmp_path_factory, faces) -> Path:
    from simple_gan.lmdb_tool import main as lmdb_main
    out = tmp_path_factory.mktemp('lmdb') / 'church_lmdb'
    assert lmdb_main(['create', str(faces), str(out), '--size', '72']) == 0
    return out


def tiny_args(**overrides) -> Namespace:
    options = dict(model='gan', nz=8, nc_out=3, width_mult=0.015625, reg_type='none',
                   lr=2e-4, beta1=0.5, lr_policy='linear', n_epochs=1, n_epochs_decay=1,
                   epoch_count=1, lr_decay_iters=50, seed=0, gan_mode='vanilla',
                   reg_lambda=1e-5, epsilon=0.1, num_rademacher_samples=2, gp_weight=10.0,
                   amp='off', channels_last=False)
    options.update(overrides)
    return Namespace(**options)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [64, 128])
def test_generator_discriminator_shapes(size):
    torch.manual_seed(0)
    G = Generator(nz=5, size=size, width_mult=1 / 64)
    D = Discriminator(size=size, width_mult=1 / 64)
    z = torch.randn(2, 5)
    x = G(z)
    assert x.shape == (2, 3, size, size), f"generator output {tuple(x.shape)}"
    assert x.abs().max() <= 1, f"tanh output outside [-1, 1]: {x.abs().max()}"
    assert D(x).shape == (2,), f"discriminator output {tuple(D(x).shape)}"
    features = G.features(z, 5)
    assert [f.shape[-1] for f in features] == [4, 8, 16, 32, 64]
    assert G.first.weight.shape[:1] == (5,), "first layer weight has one row per latent dim"


def test_published_widths():
    G = Generator(nz=30, size=128)
    assert G.first.weight.shape == (30, 1024, 4, 4)
    widths = [block[0].out_channels for block in G.blocks]
    assert widths == [1024, 512, 256, 128, 64], f"block widths {widths}"
    assert len(Generator(nz=30, size=64, width_mult=1 / 64).blocks) == 4


# ---------------------------------------------------------------------------------------------
# Regularisers against their closed forms
# ---------------------------------------------------------------------------------------------

def off_diagonal_sq_sum(M: torch.Tensor) -> float:
    return float((M - torch.diag(torch.diag(M))).pow(2).sum())


def test_orojar_linear_closed_form():
    # For h(z) = A z the variance over v of ||A v||^2 is 2 sum_{i!=j} ((A^T A)_ij)^2.
    torch.manual_seed(0)
    A1, A2 = torch.randn(7, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    z = torch.randn(8, 4, dtype=torch.float64)
    penalty = orojar_penalty(lambda c: [c @ A1.T, c @ A2.T], z, epsilon=0.1,
                             num_samples=20000)
    expected = np.mean([2 * off_diagonal_sq_sum(A.T @ A) for A in (A1, A2)])
    assert abs(float(penalty) / expected - 1) < 0.03, f"OroJaR {float(penalty)} vs {expected}"


def test_orojar_zero_for_orthogonal_columns():
    Q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    penalty = orojar_penalty(lambda c: [c @ (Q * torch.tensor([1.0, 2.0, 3.0])).T],
                             torch.randn(4, 3, dtype=torch.float64), num_samples=50)
    assert float(penalty) < 1e-8, f"OroJaR of orthogonal columns {float(penalty)}"


def test_hessian_penalty_quadratic_closed_form():
    # h_o(z) = z^T B_o z: the second difference is v^T (B_o + B_o^T) v, whose variance is
    # 2 sum_{i!=j} ((B_o + B_o^T)_ij)^2; the penalty is the maximum over outputs.
    torch.manual_seed(1)
    B = torch.randn(3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    z = torch.randn(1, 4, dtype=torch.float64)
    penalty = hessian_penalty(lambda c: [torch.einsum('ni,oij,nj->no', c, B, c)], z,
                              epsilon=0.1, num_samples=20000)
    expected = max(2 * off_diagonal_sq_sum(B[o] + B[o].T) for o in range(3))
    assert abs(float(penalty) / expected - 1) < 0.05, f"HP {float(penalty)} vs {expected}"


def test_hessian_penalty_zero_for_separable():
    z = torch.randn(3, 5, dtype=torch.float64)
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    penalty = hessian_penalty(lambda c: [(weights * c.pow(2)).sum(1, keepdim=True)], z,
                              num_samples=50)
    assert float(penalty) < 1e-12, f"HP of a separable function {float(penalty)}"


# ---------------------------------------------------------------------------------------------
# NOG and OLR on the first layer
# ---------------------------------------------------------------------------------------------

def test_nog_gives_orthonormal_rows():
    torch.manual_seed(0)
    args = tiny_args(reg_type='nog', nz=6)
    t = build_training(args, n_images=16, device=torch.device('cpu'))
    z = torch.randn(8, 6)  # batch >= nz, so the gradient has full row rank
    generator_step(t, z, t.G(z), args)
    L = t.G.first.weight.grad.reshape(6, -1).double()
    error = float((L @ L.T - torch.eye(6, dtype=torch.float64)).abs().max())
    assert error < 1e-5, f"max |L L^T - I| after NOG: {error}"
    assert t.orth.skipped == 0, f"NOG skipped {t.orth.skipped} steps"
    assert t.orth.rank_deficient == 0, f"{t.orth.rank_deficient} rank-deficient gradients"


def test_olr_group_is_first_weight():
    torch.manual_seed(0)
    t = build_training(tiny_args(reg_type='olr'), n_images=16, device=torch.device('cpu'))
    group = t.opt_G.param_groups[1]
    assert len(group['params']) == 1, f"OLR group has {len(group['params'])} parameters"
    assert group['params'][0] is t.G.first.weight
    assert all(p is not t.G.first.weight for p in t.opt_G.param_groups[0]['params'])


def test_olr_sets_eta_star():
    # eta* = a b / (a c + 2 b^2) is used only when 0 < eta* < base lr, so some seeds fall
    # back to the base lr (b = l.w < 0). A large base lr makes the used case appear.
    base_lr = 50.0
    outcomes = []
    for seed in range(6):
        torch.manual_seed(seed)
        args = tiny_args(reg_type='olr', lr=base_lr)
        t = build_training(args, n_images=16, device=torch.device('cpu'))
        z = torch.randn(4, args.nz)
        weight_before = t.G.first.weight.detach().clone()
        record = generator_step(t, z, t.G(z), args)
        eta, used = optimal_learning_rate(weight_before, t.G.first.weight.grad, base_lr)
        assert t.opt_G.param_groups[1]['lr'] == eta, f"seed {seed}: lr != eta* {eta}"
        assert t.opt_G.param_groups[0]['lr'] == base_lr, "OLR changed the other group"
        assert record['olr_eta'] == eta
        assert t.orth.last['eta_used'] == [used]
        outcomes.append(used)
    assert any(outcomes), f"eta* was never below the base lr: {outcomes}"
    assert not all(outcomes), f"the fallback never happened: {outcomes}"


def test_olr_sets_group_lr_after_restore():
    # A restored optimizer has new param_group dicts; OLR must set the lr of those.
    torch.manual_seed(0)
    args = tiny_args(reg_type='olr', lr=50.0)
    checkpoint = build_training(args, n_images=16, device=torch.device('cpu')).state_dict()
    t = build_training(args, n_images=16, device=torch.device('cpu'), checkpoint=checkpoint)
    z = torch.randn(4, args.nz)
    generator_step(t, z, t.G(z), args)
    eta = t.orth.last['eta'][0]
    assert t.orth.last['eta_used'] == [True], f"eta* {eta} was not below the base lr"
    assert t.opt_G.param_groups[1]['lr'] == eta, \
        f"group lr {t.opt_G.param_groups[1]['lr']} vs eta* {eta}"


# ---------------------------------------------------------------------------------------------
# Training end to end
# ---------------------------------------------------------------------------------------------

# Every method on the image folder; the LMDB reader (with 2 loader workers) with two of them.
@pytest.mark.parametrize('reg_type, source', [*((reg, 'folder') for reg in REG_TYPES),
                                              ('none', 'lmdb'), ('hp', 'lmdb')])
def test_train_each_reg_type(reg_type, source, faces, church_lmdb, tmp_path):
    dataroot, mode, workers = (faces, 'celeba', '0') if source == 'folder' \
        else (church_lmdb, 'lsun', '2')
    argv = ['--dataset_mode', mode, '--dataroot', str(dataroot), '--reg_type', reg_type,
            '--checkpoints_dir', str(tmp_path), '--num_threads', workers, '--max_steps', '2',
            *TINY]
    assert train.main(argv) == 0
    run_dir = tmp_path / f'{mode}_gan_{"baseline" if reg_type == "none" else reg_type}_seed0'
    state = load_checkpoint(run_dir / 'latest.pt')
    assert state['step'] == 2
    assert all(torch.isfinite(p).all() for p in state['G'].values())
    adam_steps = {float(s['step']) for s in state['opt_G']['state'].values()}
    assert adam_steps == {2.0}, f"Adam steps of the generator parameters: {adam_steps}"
    assert (run_dir / 'images' / 'step_0000002.png').is_file()
    assert len((run_dir / 'stats.jsonl').read_text().splitlines()) == 2


def test_resume_equals_uninterrupted(faces, tmp_path):
    # 8 images, batch 3: 3 steps per epoch, so step 7 crosses two epoch ends (lr decay).
    common = ['--dataset_mode', 'celeba', '--dataroot', str(faces), '--reg_type', 'nog_olr',
              '--checkpoints_dir', str(tmp_path), '--num_threads', '0', '--n_epochs', '1',
              '--n_epochs_decay', '3', *TINY, '--batch_size', '3']
    assert train.main([*common, '--name', 'whole', '--max_steps', '7']) == 0
    assert train.main([*common, '--name', 'split', '--max_steps', '4']) == 0
    assert train.main([*common, '--name', 'split', '--max_steps', '7', '--continue_train']) == 0
    whole = load_checkpoint(tmp_path / 'whole' / 'latest.pt')
    split = load_checkpoint(tmp_path / 'split' / 'latest.pt')
    assert whole['step'] == 7, f"step {whole['step']}"
    assert whole['epoch'] == 3, f"epoch {whole['epoch']}"
    for key in ('G', 'D', 'opt_G', 'opt_D', 'sched_G', 'sched_D', 'orth', 'rng', 'data_order'):
        assert_states_equal(whole[key], split[key], key)
    assert whole['sched_G']['_last_lr'][0] < 2e-4, "lr decay never happened"


def test_existing_run_needs_continue_train(faces, tmp_path):
    argv = ['--dataset_mode', 'celeba', '--dataroot', str(faces), '--checkpoints_dir',
            str(tmp_path), '--name', 'run', '--num_threads', '0', '--max_steps', '1', *TINY]
    assert train.main(argv) == 0
    from models.runs import UserError
    with pytest.raises(UserError, match='--continue_train'):
        train.main(argv)


def test_dry_run_leaves_no_run_folder(faces, tmp_path, capsys):
    argv = ['--dataset_mode', 'celeba', '--dataroot', str(faces), '--checkpoints_dir',
            str(tmp_path), '--name', 'run', '--num_threads', '0', *TINY]
    assert train.main([*argv, '--dry_run']) == 0
    assert not (tmp_path / 'run').exists(), 'the dry run left a run folder'
    assert 'dry run: 2 steps ran' in capsys.readouterr().out

    # A dry run of a resume trains 2 steps from latest.pt and leaves the run folder as it was.
    assert train.main([*argv, '--max_steps', '1']) == 0
    files = {p: p.read_bytes() for p in (tmp_path / 'run').rglob('*') if p.is_file()}
    assert train.main([*argv, '--continue_train', '--dry_run']) == 0
    assert 'resuming' in capsys.readouterr().out
    after = {p: p.read_bytes() for p in (tmp_path / 'run').rglob('*') if p.is_file()}
    assert after == files, 'the dry run changed the run folder'

    # A run already at --max_steps prints a message and trains nothing.
    assert train.main([*argv, '--continue_train', '--max_steps', '1']) == 0
    assert 'raise --max_steps' in capsys.readouterr().out
    assert load_checkpoint(tmp_path / 'run' / 'latest.pt')['step'] == 1


def test_damaged_or_finished_checkpoint_changes_nothing(faces, tmp_path, capsys):
    argv = ['--dataset_mode', 'celeba', '--dataroot', str(faces), '--checkpoints_dir',
            str(tmp_path), '--name', 'run', '--num_threads', '0', '--n_epochs', '1',
            '--n_epochs_decay', '0', *TINY]
    assert train.main(argv) == 0
    assert 'finished after epoch 1 (step 2)' in capsys.readouterr().out
    run_dir = tmp_path / 'run'
    files = {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file()}
    assert train.main([*argv, '--continue_train']) == 0
    assert 'training finished after epoch 1' in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file()} == files

    latest = run_dir / 'latest.pt'
    latest.write_bytes(files[latest][:200])
    files[latest] = latest.read_bytes()
    from models.runs import UserError
    with pytest.raises(UserError, match='corrupted'):
        train.main([*argv, '--n_epochs', '2', '--continue_train'])
    assert {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file()} == files


def test_published_command_parses():
    argv = ('--dataset_mode celeba --model gan128 --nz 30 --reg_type nog '
            '--dataroot CELEBA_ROOT --name celeba_nog').split()
    args = train.build_parser().parse_args(argv)
    assert (args.batch_size, args.lr, args.beta1, args.gan_mode) == (128, 2e-4, 0.5, 'vanilla')
    assert (args.n_epochs, args.n_epochs_decay, args.lr_policy) == (600, 600, 'linear')
    assert (args.reg_lambda, args.epsilon, args.num_rademacher_samples) == (1e-5, 0.1, 2)


def test_sigterm_saves_and_resumes(faces, tmp_path):
    # SIGTERM goes to the whole process group, data-loader workers included, as `timeout`
    # sends it.
    argv = [sys.executable, str(REPO / 'simple_gan' / 'train.py'), '--dataset_mode', 'celeba',
            '--dataroot', str(faces), '--checkpoints_dir', str(tmp_path), '--name', 'run',
            '--num_threads', '2', '--n_epochs', '1000', *TINY]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO / 'simple_gan', start_new_session=True,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith('epoch '):
            os.killpg(process.pid, signal.SIGTERM)
            break
    output = ''.join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 0, f"exit status {process.returncode}:\n{output}"
    assert 'stopped by SIGTERM after step' in output, output
    step = load_checkpoint(tmp_path / 'run' / 'latest.pt')['step']
    assert step >= 1

    resumed = ['--dataset_mode', 'celeba', '--dataroot', str(faces), '--checkpoints_dir',
               str(tmp_path), '--name', 'run', '--num_threads', '0', '--n_epochs', '1000',
               '--continue_train', '--max_steps', str(step + 1), *TINY]
    assert train.main(resumed) == 0
    assert load_checkpoint(tmp_path / 'run' / 'latest.pt')['step'] == step + 1


# ---------------------------------------------------------------------------------------------
# SeFa
# ---------------------------------------------------------------------------------------------

def test_sefa_rotation_preserves_images():
    torch.manual_seed(0)
    G = Generator(nz=6, size=64, width_mult=1 / 64).eval()
    rotated, U = sefa_rotated(G)
    c = torch.randn(3, 6)
    with torch.no_grad():
        diff = (rotated(c) - G(c @ U.T)).abs().max()
    assert diff < 1e-5, f"G'(c) vs G(U c): max diff {diff}"

    W = G.first.weight.detach().double().reshape(6, -1)
    _, S = sefa_directions(G)
    U64 = U.double()
    residual = (W @ W.T @ U64 - U64 * S.double().pow(2)).abs().max() / S[0].double() ** 2
    assert residual < 1e-5, f"columns of U are not eigenvectors of W W^T: {residual}"
    assert torch.all(S[:-1] >= S[1:]), f"singular values not sorted: {S}"
    orth = (U64.T @ U64 - torch.eye(6, dtype=torch.float64)).abs().max()
    assert orth < 1e-5, f"U is not orthogonal: {orth}"


def test_visualize_writes_grids_and_gif(tmp_path):
    from models.runs import save_checkpoint
    from simple_gan import visualize
    G = Generator(nz=8, size=64, width_mult=1 / 64)
    config = {'model': 'gan', 'nz': 8, 'nc_out': 3, 'width_mult': 1 / 64}
    (tmp_path / 'run').mkdir()
    save_checkpoint(tmp_path / 'run' / 'latest.pt', {'G': G.state_dict(), 'model_config': config})
    out = tmp_path / 'vis'
    assert visualize.main(['--model_path', str(tmp_path / 'run'), '--samples', '2',
                           '--steps', '3', '--sefa', '--device', 'cpu',
                           '--save_dir', str(out)]) == 0
    grids = sorted((out / 'traversals_sefa' / 'latest').glob('dim_*.png'))
    assert len(grids) == 8, f"{len(grids)} traversal grids for nz 8"
    with Image.open(out / 'traversals_sefa' / 'latest' / 'traversal.gif') as gif:
        assert gif.n_frames == 4, f"GIF frames {gif.n_frames} (3 forward, 1 back)"
    with Image.open(grids[0]) as grid:
        assert grid.size == (3 * 66 + 2, 2 * 66 + 2), f"grid size {grid.size}"
