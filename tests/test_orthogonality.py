"""Tests of NOG, OLR, the orthogonality error and the parameter groups (models/orthogonality.py)."""
import math

import pytest
import torch
from torch import nn

from models.orthogonality import (NOG_METHODS, OrthogonalUpdate, nearest_orthogonal,
                                  optimal_learning_rate, orthogonality_error,
                                  split_param_groups)

# Tall CIFAR stem, its transpose, and wide GAN-like layers.
SHAPES = [(64, 27), (27, 64), (6, 512), (30, 200)]


def polar_reference(L):
    U, _, Vh = torch.linalg.svd(L.double(), full_matrices=False)
    return U @ Vh


def gram_error(Q):
    """||Q Q^T - I|| for wide Q, ||Q^T Q - I|| for tall Q, in float64."""
    Q = Q.double()
    gram = Q @ Q.T if Q.shape[0] <= Q.shape[1] else Q.T @ Q
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()


def random_rotation(Q, t, generator):
    """exp(t K) for a random skew K acting on a subspace that contains the columns of Q.

    K = V k V^T with V orthonormal (n, s), so exp(t K) = I + V (exp(t k) - I) V^T stays cheap
    for n = 512.
    """
    n, p = Q.shape
    extra = torch.randn(n, min(p, n - p), generator=generator, dtype=torch.float64)
    V, _ = torch.linalg.qr(torch.cat([Q, extra], dim=1))           # (n, s)
    s = V.shape[1]
    k = torch.randn(s, s, generator=generator, dtype=torch.float64)
    k = (k - k.T) / 2
    inner = torch.linalg.matrix_exp(t * k) - torch.eye(s, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) + V @ inner @ V.T


# ----------------------------------------------------------------------------------------------
# nearest_orthogonal

@pytest.mark.parametrize('shape', SHAPES)
def test_nog_matches_svd_polar_factor(shape):
    L = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q, rank = nearest_orthogonal(L)
    diff = (Q - polar_reference(L)).abs().max().item()
    assert diff < 1e-10, f"max |Q - U V^T| = {diff:.3g} (float64, tolerance 1e-10)"
    assert rank == min(shape), f"rank {rank}, expected {min(shape)}"
    error = gram_error(Q)
    assert error < 1e-10, f"orthonormality error {error:.3g} (tolerance 1e-10)"


@pytest.mark.parametrize('shape', SHAPES)
def test_nog_keeps_float32_dtype(shape):
    L = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    Q, _ = nearest_orthogonal(L)
    assert Q.dtype == torch.float32, f"dtype {Q.dtype}"
    diff = (Q.double() - polar_reference(L)).abs().max().item()
    assert diff < 1e-6, f"max |Q - U V^T| = {diff:.3g} (float32 output, tolerance 1e-6)"


@pytest.mark.parametrize('shape', SHAPES)
def test_nog_no_nearby_orthogonal_is_nearer(shape):
    generator = torch.Generator().manual_seed(2)
    L = torch.randn(*shape, generator=generator, dtype=torch.float64)
    Q, _ = nearest_orthogonal(L)
    best = torch.linalg.matrix_norm(L - Q).item()
    m, n = shape
    for trial in range(3):
        for t in (1e-3, 1e-2, 1e-1):
            # Right rotations reach every matrix with orthonormal rows (wide), left rotations
            # every matrix with orthonormal columns (tall).
            if m <= n:
                nearby = Q @ random_rotation(Q.T, t, generator)
            else:
                nearby = random_rotation(Q, t, generator) @ Q
            assert gram_error(nearby) < 1e-10, "test setup: rotated matrix is not orthogonal"
            distance = torch.linalg.matrix_norm(L - nearby).item()
            assert distance >= best - 1e-10, (
                f"trial {trial}, t={t}: ||L - Q exp(tK)|| = {distance:.12g} < "
                f"||L - Q|| = {best:.12g}")


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_nog_rank_deficient_partial_isometry(shape, dtype):
    generator = torch.Generator().manual_seed(3)
    r = 4
    m, n = shape
    L = (torch.randn(m, r, generator=generator, dtype=torch.float64)
         @ torch.randn(r, n, generator=generator, dtype=torch.float64)).to(dtype)
    Q, rank = nearest_orthogonal(L)
    assert rank == r, f"rank {rank}, expected {r}"
    s = torch.linalg.svdvals(Q.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (s[:r] - 1).abs().max() < tol, f"leading singular values {s[:r].tolist()}"
    assert s[r:].abs().max() < tol, f"trailing singular values up to {s[r:].max().item():.3g}"
    # Same range and row space as L: Q = U_r V_r^T.
    U, _, Vh = torch.linalg.svd(L.double(), full_matrices=False)
    expected = U[:, :r] @ Vh[:r]
    diff = (Q.double() - expected).abs().max().item()
    assert diff < tol, f"max |Q - U_r V_r^T| = {diff:.3g} (tolerance {tol})"


@pytest.mark.parametrize('shape', SHAPES)
def test_newton_schulz_matches_svd(shape):
    L = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    Q_ns, rank_ns = nearest_orthogonal(L, method='newton_schulz')
    Q_svd, rank_svd = nearest_orthogonal(L, method='svd')
    diff = (Q_ns - Q_svd).abs().max().item()
    assert diff < 1e-5, f"max |Q_ns - Q_svd| = {diff:.3g} (float32, tolerance 1e-5)"
    assert rank_ns == rank_svd, f"rank {rank_ns} (Newton-Schulz) vs {rank_svd} (svd)"
    assert Q_ns.dtype == L.dtype, f"dtype {Q_ns.dtype}"


def test_newton_schulz_rank_deficient():
    generator = torch.Generator().manual_seed(5)
    L = torch.randn(6, 3, generator=generator) @ torch.randn(3, 512, generator=generator)
    Q, rank = nearest_orthogonal(L, method='newton_schulz')
    assert rank == 3, f"rank {rank}, expected 3"
    diff = (Q - nearest_orthogonal(L)[0]).abs().max().item()
    assert diff < 1e-4, f"max |Q_ns - U_r V_r^T| = {diff:.3g} (tolerance 1e-4)"


@pytest.mark.parametrize('method', NOG_METHODS)
def test_nog_zero_and_invalid_input(method):
    Q, rank = nearest_orthogonal(torch.zeros(5, 7), method=method)
    assert rank == 0, f"rank {rank}"
    assert not Q.any(), "zero input must give a zero output"
    with pytest.raises(ValueError, match='NaN or Inf'):
        nearest_orthogonal(torch.tensor([[1.0, float('nan')]]), method=method)
    with pytest.raises(ValueError, match='2-D'):
        nearest_orthogonal(torch.ones(2, 3, 4), method=method)
    with pytest.raises(ValueError, match='unknown NOG method'):
        nearest_orthogonal(torch.ones(2, 3), method='qr')


# ----------------------------------------------------------------------------------------------
# optimal_learning_rate

def eta_float64(w, l):
    w, l = w.double().reshape(-1), l.double().reshape(-1)
    a, b, c = (w @ w).item(), (l @ w).item(), (l @ l).item()
    return a * b / (a * c + 2 * b * b)


@pytest.mark.parametrize('shape', SHAPES)
def test_olr_matches_formula_random(shape):
    generator = torch.Generator().manual_seed(6)
    w = torch.randn(*shape, generator=generator)
    # A gradient correlated with the weight so that b = l.w > 0 and eta* lies in (0, 1).
    l = w + 0.5 * torch.randn(*shape, generator=generator)
    expected = eta_float64(w, l)
    assert 0 < expected < 1, f"test setup: eta* = {expected}"
    eta, used = optimal_learning_rate(w, l, base_lr=1.0)
    assert type(eta) is float, f"type {type(eta)}"
    assert used, f"eta* = {expected} in (0, 1) was not used"
    assert math.isclose(eta, expected, rel_tol=1e-12), f"eta {eta} vs float64 {expected}"


def test_olr_hand_made():
    # w = (1, 0), l = (1, 1): a = 1, b = 1, c = 2, eta* = 1 / (2 + 2) = 0.25.
    w, l = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert optimal_learning_rate(w, l, base_lr=1.0) == (0.25, True)
    # eta* >= base_lr: the fallback, also when they are equal.
    assert optimal_learning_rate(w, l, base_lr=0.1) == (0.1, False)
    assert optimal_learning_rate(w, l, base_lr=0.25) == (0.25, False)
    # w = (2, 0), l = (3, 4): a = 4, b = 6, c = 25, eta* = 24 / (100 + 72) = 6 / 43.
    eta, used = optimal_learning_rate(torch.tensor([2.0, 0.0]), torch.tensor([3.0, 4.0]), 1.0)
    assert used and math.isclose(eta, 6 / 43, rel_tol=1e-12), f"eta {eta}, expected {6 / 43}"


def test_olr_negative_eta_falls_back():
    # b = l.w < 0 gives eta* < 0.
    eta, used = optimal_learning_rate(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), 0.05)
    assert (eta, used) == (0.05, False), f"got {(eta, used)}"


@pytest.mark.parametrize('case', ['zero_grad', 'orthogonal_grad', 'zero_weight'])
def test_olr_degenerate_falls_back(case):
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(6, 20, generator=generator)
    l = torch.randn(6, 20, generator=generator)
    if case == 'zero_grad':
        l = torch.zeros_like(w)
    elif case == 'orthogonal_grad':
        # Disjoint supports make l.w exactly zero, so eta* = 0. A numerically orthogonal l
        # would give a tiny eta* of either sign.
        w[:, 1::2] = 0
        l[:, 0::2] = 0
    else:
        w = torch.zeros_like(w)
    eta, used = optimal_learning_rate(w, l, base_lr=0.1)
    assert type(eta) is float, f"type {type(eta)}"
    assert not math.isnan(eta), "eta is NaN"
    assert (eta, used) == (0.1, False), f"got {(eta, used)}"


def test_orthogonality_error_values():
    assert orthogonality_error(torch.eye(4)) == 0.0
    Q = polar_reference(torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(8))
                        .reshape(3, 8)).reshape(3, 2, 2, 2)
    assert orthogonality_error(Q) < 1e-12, f"error {orthogonality_error(Q)}"
    # Tall 2x1 matrix (3, 4)^T: M^T M = 25, so the error is 24.
    assert orthogonality_error(torch.tensor([[3.0], [4.0]])) == 24.0


# ----------------------------------------------------------------------------------------------
# split_param_groups and OrthogonalUpdate

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, bias=False)   # pre-SVD weight, 8 x 27
        self.head = nn.Linear(8, 4)


@pytest.mark.parametrize('wrap', [lambda m: m, nn.Sequential, nn.DataParallel])
def test_split_groups_by_identity(wrap):
    torch.manual_seed(0)
    model = Tiny()
    wrapped = wrap(model)
    groups = split_param_groups(wrapped.parameters(), [model.stem.weight], momentum=0.0)
    assert len(groups) == 2, f"{len(groups)} groups"
    assert groups[1]['params'][0] is model.stem.weight
    assert groups[1]['name'] == 'pre_svd_0', f"name {groups[1]['name']}"
    assert groups[1]['momentum'] == 0.0, f"momentum {groups[1]['momentum']}"
    others = {id(p) for p in groups[0]['params']}
    assert others == {id(model.head.weight), id(model.head.bias)}


def test_split_groups_missing_raises():
    model = Tiny()
    with pytest.raises(ValueError, match='not among'):
        split_param_groups(model.head.parameters(), [model.stem.weight])
    with pytest.raises(ValueError, match='more than once'):
        split_param_groups(model.parameters(), [model.stem.weight, model.stem.weight])


def make_update(nog=True, olr=True, lr=0.1):
    torch.manual_seed(0)
    model = Tiny()
    groups = split_param_groups(model.parameters(), [model.stem.weight])
    optimizer = torch.optim.SGD(groups, lr=lr)
    return model, optimizer, OrthogonalUpdate(optimizer, [model.stem.weight], nog=nog, olr=olr)


def set_grads(model, stem_grad):
    generator = torch.Generator().manual_seed(9)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    model.stem.weight.grad = stem_grad


@pytest.mark.parametrize('bad', ['nan', 'inf', 'zero', 'none'])
def test_update_skips_bad_gradient(bad):
    model, _, update = make_update()
    grad = torch.randn(model.stem.weight.shape)
    if bad == 'nan':
        grad[0, 0, 0, 0] = float('nan')
    elif bad == 'inf':
        grad[1, 2, 0, 1] = float('-inf')
    elif bad == 'zero':
        grad.zero_()
    set_grads(model, None if bad == 'none' else grad)
    before = None if bad == 'none' else grad.clone()
    lr_before = [g['lr'] for g in update.optimizer.param_groups]

    assert update.apply(base_lr=0.1) is False
    assert update.skipped == 1, f"skipped = {update.skipped}"
    after = model.stem.weight.grad
    if bad == 'none':
        assert after is None
    else:
        assert torch.equal(after.isnan(), before.isnan())
        assert torch.equal(after.nan_to_num(), before.nan_to_num()), "gradient was changed"
    lr_after = [g['lr'] for g in update.optimizer.param_groups]
    assert lr_after == lr_before, f"learning rates changed: {lr_before} -> {lr_after}"
    assert update.last == {'eta': [], 'eta_used': []}


def test_update_sets_only_pre_svd_lr():
    model, optimizer, update = make_update()
    # Gradient aligned with the weight so that eta* is in (0, base_lr).
    W = model.stem.weight.detach()
    set_grads(model, W + 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1)))
    base_lr = 0.5
    optimizer.param_groups[0]['lr'] = base_lr

    assert update.apply(base_lr) is True
    grad = model.stem.weight.grad
    Q_ref = polar_reference(grad.reshape(8, -1))
    assert gram_error(grad.reshape(8, -1)) < 1e-5, "gradient was not orthogonalised"
    expected, used = optimal_learning_rate(model.stem.weight, grad, base_lr)
    assert optimizer.param_groups[1]['lr'] == expected, f"lr {optimizer.param_groups[1]['lr']}"
    assert optimizer.param_groups[0]['lr'] == base_lr
    assert update.last == {'eta': [expected], 'eta_used': [used]}
    assert used, f"eta* = {expected} not used with base_lr {base_lr}"

    # The SGD step moves the weight by -eta * U V^T.
    W_before = model.stem.weight.detach().clone()
    optimizer.step()
    step = (W_before - model.stem.weight.detach()).reshape(8, -1).double()
    diff = (step - expected * Q_ref).abs().max().item()
    assert diff < 1e-6, f"max |step - eta U V^T| = {diff:.3g}"


def test_update_rank_deficient_counted_and_state():
    model, _, update = make_update(olr=False)
    generator = torch.Generator().manual_seed(10)
    low_rank = torch.randn(8, 2, generator=generator) @ torch.randn(2, 27, generator=generator)
    set_grads(model, low_rank.reshape(8, 3, 3, 3))
    assert update.apply(0.1) is True
    assert update.rank_deficient == 1, f"rank_deficient = {update.rank_deficient}"
    assert update.last == {'eta': [], 'eta_used': []}
    state = update.state_dict()
    _, _, fresh = make_update(olr=False)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == {'applied': 1, 'skipped': 0, 'rank_deficient': 1}


def test_update_olr_needs_own_group():
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='alone in its optimizer group'):
        OrthogonalUpdate(optimizer, [model.stem.weight], nog=True, olr=True)
    # NOG alone works with the parameter inside a shared group.
    OrthogonalUpdate(optimizer, [model.stem.weight], nog=True, olr=False)
    other = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='in no parameter group'):
        OrthogonalUpdate(other, [model.stem.weight], nog=True, olr=False)


def test_update_olr_only_nan_falls_back():
    # Without NOG, apply never skips a step because a non-finite gradient is left to the
    # optimizer or GradScaler. OLR falls back to base_lr instead of producing NaN.
    model, optimizer, update = make_update(nog=False, olr=True)
    grad = torch.ones(model.stem.weight.shape)
    grad[0, 0, 0, 0] = float('nan')
    set_grads(model, grad)
    assert update.apply(base_lr=0.05) is True
    assert optimizer.param_groups[1]['lr'] == 0.05, f"lr {optimizer.param_groups[1]['lr']}"
    assert update.last == {'eta': [0.05], 'eta_used': [False]}
    assert update.skipped == 0, f"skipped = {update.skipped}"


def test_update_olr_after_optimizer_reload():
    # Optimizer.load_state_dict replaces the group dicts; OLR must set the live group's lr.
    model, optimizer, update = make_update()
    W = model.stem.weight.detach()
    set_grads(model, W + 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1)))
    optimizer.load_state_dict(optimizer.state_dict())
    base_lr = 0.5
    optimizer.param_groups[0]['lr'] = base_lr

    assert update.apply(base_lr) is True
    expected = update.last['eta'][0]
    assert update.last['eta_used'] == [True], f"eta* = {expected} not used"
    live_lr = optimizer.param_groups[1]['lr']
    assert live_lr == expected, f"live group lr {live_lr}, expected eta* {expected}"
