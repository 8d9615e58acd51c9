"""Tests of the ZCA meta-layer (models/zca.py): whitening, backends, statistics, recompute."""
import math

import pytest
import torch
from torch import nn

from models.zca import (BACKENDS, PADE_P, PADE_Q, TAYLOR_TERMS, ZCANormBatch,
                        covariance_condition, inverse_sqrt, meta_layers,
                        recompute_norm_statistics, solve_lyapunov_newton_schulz)

F64 = torch.float64


def spd_matrix(eigenvalues, seed=0) -> torch.Tensor:
    """Return Q diag(eigenvalues) Q^T in float64 with a seeded random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ Q.T


def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the float64 mean (G, n, 1) and biased covariance (G, n, n) of x per group."""
    N, C = x.shape[:2]
    X = x.double().transpose(0, 1).reshape(groups, C // groups, -1)     # (G, n, N*H*W)
    mean = X.mean(-1, keepdim=True)
    Xc = X - mean
    return mean, Xc @ Xc.mT / X.shape[-1]


def rank_deficient_input(rank=27, channels=64, seed=0) -> torch.Tensor:
    """Return (8, channels, 4, 4) features whose covariance has the given rank."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, rank, generator=g)
    z = torch.randn(rank, 8 * 4 * 4, generator=g)
    return (mixing @ z).reshape(channels, 8, 4, 4).transpose(0, 1).contiguous()


def degenerate_input(channels=8, seed=0) -> torch.Tensor:
    """Return (8, channels, 4, 4) features with covariance exactly I: all eigenvalues equal."""
    g = torch.Generator().manual_seed(seed)
    m = 8 * 4 * 4
    z = torch.randn(m, channels, generator=g, dtype=F64)
    z = z - z.mean(0)                               # orthogonal to the ones vector
    Q, _ = torch.linalg.qr(z)                       # orthonormal, still zero-mean columns
    X = (Q.T * math.sqrt(m)).float()                # (channels, m), X X^T / m = I
    return X.reshape(channels, 8, 4, 4).transpose(0, 1).contiguous()


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('backend', ['svd', 'exact'])
def test_whitened_covariance_is_identity_minus_eps_inverse(backend, groups):
    torch.manual_seed(0)
    x = torch.randn(16, 8, 4, 4) @ torch.randn(4, 4) + 0.5       # correlated, nonzero mean
    x = x + 0.3 * x.roll(1, dims=1)
    layer = ZCANormBatch(8, groups=groups, eps=1e-2, backend=backend)
    y = layer(x).detach()
    _, cov_y = group_moments(y, groups)
    _, cov_x = group_moments(x, groups)
    eye = torch.eye(8 // groups, dtype=F64)
    expected = eye - 1e-2 * torch.linalg.inv(cov_x + 1e-2 * eye)
    err = (cov_y - expected).abs().max().item()
    assert err < 1e-4, f"max |cov(y) - (I - eps Sigma^-1)| = {err:.2e}"


@pytest.mark.parametrize('groups', [1, 2])
def test_whitened_covariance_tends_to_identity(groups):
    torch.manual_seed(1)
    x = torch.randn(32, 4, 4, 4).double() @ torch.randn(4, 4, dtype=F64)
    layer = ZCANormBatch(4, groups=groups, eps=1e-9, backend='exact')
    _, cov_y = group_moments(layer(x).detach(), groups)
    err = (cov_y - torch.eye(4 // groups, dtype=F64)).abs().max().item()
    assert err < 1e-6, f"max |cov(y) - I| with eps=1e-9 = {err:.2e}"


@pytest.mark.parametrize('groups', [1, 2])
def test_mpa_whitening_of_well_conditioned_batch(groups):
    torch.manual_seed(2)
    x = torch.randn(64, 4, 4, 4)                     # covariance close to I, kappa ~ 1.3
    layer = ZCANormBatch(4, groups=groups, eps=1e-2, backend='mpa')
    y = layer(x).detach()
    _, cov_y = group_moments(y, groups)
    _, cov_x = group_moments(x, groups)
    eye = torch.eye(4 // groups, dtype=F64)
    expected = eye - 1e-2 * torch.linalg.inv(cov_x + 1e-2 * eye)
    err = (cov_y - expected).abs().max().item()
    assert err < 1e-4, f"mpa: max |cov(y) - (I - eps Sigma^-1)| = {err:.2e}"
    assert layer.last_stats['whitening_residual'] < 1e-4, layer.last_stats


@pytest.mark.parametrize('groups', [1, 2])
def test_running_statistics_update_in_place_and_serve_eval(groups):
    torch.manual_seed(3)
    x = torch.randn(16, 4, 3, 3) * 2 + 1
    layer = ZCANormBatch(4, groups=groups, momentum=0.1)
    mean_ptr = layer.running_mean.data_ptr()
    whitening_ptr = layer.running_whitening.data_ptr()
    layer(x)
    assert layer.running_mean.data_ptr() == mean_ptr
    assert layer.running_whitening.data_ptr() == whitening_ptr
    assert int(layer.num_batches_tracked) == 1

    mean, cov = group_moments(x, groups)
    eye = torch.eye(4 // groups, dtype=F64)
    S = inverse_sqrt(cov + 1e-2 * eye, 'exact')
    err_mean = (layer.running_mean.double() - 0.1 * mean).abs().max().item()
    err_white = (layer.running_whitening.double() - (0.9 * eye + 0.1 * S)).abs().max().item()
    assert err_mean < 1e-6, f"running_mean error {err_mean:.2e}"
    assert err_white < 1e-5, f"running_whitening error {err_white:.2e}"

    # Evaluation: y = gamma * W_run (x - m_run) + beta with the running buffers.
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    layer.eval()
    x_eval = torch.randn(2, 4, 3, 3)
    y = layer(x_eval)
    X = x_eval.double().transpose(0, 1).reshape(groups, 4 // groups, -1)
    Y = layer.running_whitening.double() @ (X - layer.running_mean.double())
    Y = Y.reshape(4, -1) * layer.weight.double()[:, None] + layer.bias.double()[:, None]
    expected = Y.reshape(4, 2, 3, 3).transpose(0, 1)
    err = (y.double() - expected).abs().max().item()
    assert err < 1e-5, f"eval output error {err:.2e}"
    assert int(layer.num_batches_tracked) == 1, "eval forward must not update statistics"


def test_momentum_none_is_cumulative_average():
    torch.manual_seed(4)
    layer = ZCANormBatch(3, momentum=None)
    batches = [torch.randn(8, 3, 2, 2) + k for k in range(3)]
    for x in batches:
        layer(x)
    mean = torch.stack([group_moments(x, 1)[0] for x in batches]).mean(0)
    err = (layer.running_mean.double() - mean).abs().max().item()
    assert err < 1e-5, f"cumulative running_mean error {err:.2e}"


def test_exact_backward_passes_gradcheck():
    Sigma = torch.stack([spd_matrix([0.5, 1.0, 2.0, 3.5], seed=0),
                         spd_matrix([0.2, 0.3, 1.5, 4.0], seed=1)]).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: inverse_sqrt(s, 'exact'), (Sigma,))


def _forward_backward(Sigma, backend, grad_S):
    Sigma = Sigma.clone().requires_grad_()
    S = inverse_sqrt(Sigma, backend)
    grad, = torch.autograd.grad(S, Sigma, grad_S)
    return S.detach(), grad


@pytest.mark.parametrize('eigenvalues', [[1, 4, 16, 64, 256], [1, 1.5, 2.25, 3.4]])
def test_svd_matches_exact_within_series_error(eigenvalues):
    # The svd backward replaces each divided difference P_ij by P_ij (1 - r_ij^(K+1)),
    # r_ij = min(l_i, l_j)/max(l_i, l_j), so ||grad_svd - grad_exact||_F is at most
    # max_ij |P_ij| r_ij^(K+1) * ||sym(dS)||_F.
    Sigma = spd_matrix(eigenvalues, seed=5)
    grad_S = torch.randn(len(eigenvalues), len(eigenvalues), dtype=F64,
                         generator=torch.Generator().manual_seed(5))
    S_svd, g_svd = _forward_backward(Sigma, 'svd', grad_S)
    S_exact, g_exact = _forward_backward(Sigma, 'exact', grad_S)
    assert (S_svd - S_exact).abs().max().item() < 1e-12

    lam = torch.tensor(eigenvalues, dtype=F64)
    s = lam.sqrt()
    P = -1.0 / (s[:, None] * s[None, :] * (s[:, None] + s[None, :]))
    ratio = torch.minimum(lam[:, None], lam[None, :]) / torch.maximum(lam[:, None], lam[None, :])
    ratio.fill_diagonal_(0.0)
    bound = (P.abs() * ratio ** (TAYLOR_TERMS + 1)).max() * (0.5 * (grad_S + grad_S.T)).norm()
    err = (g_svd - g_exact).norm().item()
    assert err <= 1.01 * bound.item() + 1e-12, f"svd gradient error {err:.2e} > {bound:.2e}"
    if eigenvalues[1] / eigenvalues[0] >= 4:
        rel = err / g_exact.norm().item()
        assert rel < 1e-5, f"well-separated spectrum: relative error {rel:.2e}"


def test_mpa_matches_exact_when_well_conditioned():
    Sigma = spd_matrix([1.0, 1.3, 1.6, 2.0], seed=6)
    grad_S = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    S_mpa, g_mpa = _forward_backward(Sigma, 'mpa', grad_S)
    S_exact, g_exact = _forward_backward(Sigma, 'exact', grad_S)
    rel_forward = ((S_mpa - S_exact).norm() / S_exact.norm()).item()
    rel_backward = ((g_mpa - g_exact).norm() / g_exact.norm()).item()
    assert rel_forward < 1e-5, f"mpa forward relative error {rel_forward:.2e} at kappa 2"
    assert rel_backward < 1e-5, f"mpa backward relative error {rel_backward:.2e} at kappa 2"


def test_pade_coefficients_match_scipy():
    from scipy.interpolate import pade
    taylor = [1.0]
    for k in range(1, 11):                          # (1 - z)^{1/2} = sum binom(1/2, k) (-z)^k
        taylor.append(-taylor[-1] * (0.5 - (k - 1)) / k)
    p, q = pade(taylor, 5)
    scale = q.coeffs[-1]
    err_p = max(abs(a - b) for a, b in zip(PADE_P, p.coeffs[::-1] / scale))
    err_q = max(abs(a - b) for a, b in zip(PADE_Q, q.coeffs[::-1] / scale))
    assert err_p < 1e-10, f"p coefficients differ by {err_p:.2e}"
    assert err_q < 1e-10, f"q coefficients differ by {err_q:.2e}"


def test_lyapunov_solver_residual():
    R = spd_matrix([0.8, 1.0, 1.2, 1.5], seed=7)
    C = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    C = C + C.T
    X = solve_lyapunov_newton_schulz(R, C)
    residual = ((R @ X + X @ R - C).norm() / C.norm()).item()
    assert residual < 1e-6, f"relative Lyapunov residual {residual:.2e}"


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('case', ['rank27', 'repeated'])
def test_degenerate_covariance_gives_finite_gradients(backend, groups, case):
    x = rank_deficient_input() if case == 'rank27' else degenerate_input(channels=8)
    x.requires_grad_()
    layer = ZCANormBatch(x.shape[1], groups=groups, eps=1e-2, backend=backend)
    y = layer(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(8))).sum().backward()
    assert torch.isfinite(y).all(), f"{backend}: non-finite output"
    assert torch.isfinite(x.grad).all(), f"{backend}: non-finite input gradient"
    assert torch.isfinite(layer.weight.grad).all(), f"{backend}: non-finite weight gradient"
    stats = layer.last_stats
    if case == 'rank27':
        assert stats['rank'] <= 27, f"rank of a rank-27 covariance reported as {stats['rank']}"
        assert stats['kappa'] > 1e2, f"kappa of a rank-27 covariance {stats['kappa']:.3g}"


@pytest.mark.parametrize('groups', [1, 2])
def test_bf16_autocast_output_dtype(groups):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ZCANormBatch(8, groups=groups))
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        h = model[0](x)
        y = model[1](h)
        y_direct = model[1](x.repeat(1, 3, 1, 1)[:, :8])
    assert h.dtype == torch.bfloat16, f"conv output dtype {h.dtype} (autocast inactive?)"
    assert y.dtype == torch.bfloat16, f"bf16 input gave output dtype {y.dtype}"
    assert y_direct.dtype == torch.float32, f"float32 input gave output dtype {y_direct.dtype}"
    assert torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert torch.isfinite(model[0].weight.grad).all(), "non-finite conv gradient under bf16"


def test_covariance_condition_of_known_spectrum():
    eps = 1e-2
    raw_a = [1e-7, 1e-3, 1.0, 10.0]                  # kappa_raw 1e8, rank 3 (1e-7 < 1e-5 * 10)
    raw_b = [0.5, 1.0, 2.0, 4.0]
    Sigma = torch.stack([spd_matrix([v + eps for v in raw_a], seed=10),
                         spd_matrix([v + eps for v in raw_b], seed=11)])
    result = covariance_condition(Sigma, eps)
    kappa = (10.0 + eps) / (1e-7 + eps)
    assert math.isclose(result['kappa'], kappa, rel_tol=1e-9), result
    assert math.isclose(result['kappa_raw'], 1e8, rel_tol=1e-6), result
    assert result['rank'] == 3, result
    assert isinstance(result['rank'], int) and isinstance(result['kappa'], float)

    negative = spd_matrix([eps - 1e-9, eps + 1.0, eps + 2.0], seed=12)
    assert covariance_condition(negative, eps)['kappa_raw'] == math.inf


class _Probe(nn.Module):
    """BatchNorm2d followed by the meta-layer and another BatchNorm2d."""

    def __init__(self, groups):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(4)
        self.zca = ZCANormBatch(4, groups=groups, eps=1e-2)
        self.bn_out = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_out(self.zca(self.bn_in(x)))


@pytest.mark.parametrize('groups', [1, 2])
def test_recompute_matches_full_data_statistics(groups):
    torch.manual_seed(13)
    batches = [torch.randn(8, 4, 3, 3) @ torch.randn(3, 3) + 2.0 for _ in range(3)]
    model = _Probe(groups)
    with torch.no_grad():                            # stale statistics to overwrite
        model.bn_in.running_mean.fill_(100.0)
        model.zca.running_mean.fill_(-5.0)
    model.eval()
    recompute_norm_statistics(model, [(b, 0) for b in batches], torch.device('cpu'))

    assert not model.training, "model left in train mode"
    assert not model.zca.training, "meta-layer left in train mode"
    assert model.bn_in.momentum == 0.1, f"BatchNorm momentum {model.bn_in.momentum}"
    assert model.zca.momentum == 0.1, f"meta-layer momentum {model.zca.momentum}"
    assert int(model.bn_in.num_batches_tracked) == 3
    batch_means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    err_bn = (model.bn_in.running_mean - batch_means.mean(0)).abs().max().item()
    assert err_bn < 1e-5, f"BatchNorm running_mean error {err_bn:.2e}"

    # The meta-layer receives the output of bn_in in train mode, batch by batch.
    normalised = torch.cat([nn.functional.batch_norm(b, None, None, training=True, eps=1e-5)
                            for b in batches])
    mean, cov = group_moments(normalised, groups)
    eye = torch.eye(4 // groups, dtype=F64)
    S = inverse_sqrt(cov + 1e-2 * eye, 'exact')
    err_mean = (model.zca.running_mean.double() - mean).abs().max().item()
    err_white = (model.zca.running_whitening.double() - S).abs().max().item()
    assert err_mean < 1e-5, f"meta-layer running_mean error {err_mean:.2e}"
    assert err_white < 1e-4, f"meta-layer running_whitening error {err_white:.2e}"
    assert meta_layers(model) == [model.zca]


def test_recompute_rejects_empty_inputs():
    model = _Probe(1)
    with torch.no_grad():
        model.bn_in.running_mean.fill_(7.0)
    with pytest.raises(ValueError, match="at least one"):
        recompute_norm_statistics(model, [], torch.device('cpu'))
    assert model.bn_in.running_mean[0].item() == 7.0, "statistics changed before the error"


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="backend"):
        ZCANormBatch(8, backend='cholesky')
    with pytest.raises(ValueError, match="backend"):
        inverse_sqrt(torch.eye(3, dtype=F64), backend='newton')
    with pytest.raises(ValueError, match="divisible"):
        ZCANormBatch(10, groups=4)
    with pytest.raises(ValueError, match="channels"):
        ZCANormBatch(8)(torch.randn(2, 6, 3, 3))
