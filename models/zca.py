"""Decorrelated batch norm with ZCA whitening: the SVD meta-layer.

The layer follows Huang et al., "Decorrelated Batch Normalization", CVPR 2018 (arXiv 1804.08450).
Per group of ``n = C/G`` channels, with ``X`` the ``(n, m)`` matrix of features (``m = N*H*W``)
and ``mu`` its row mean,

    Sigma = (X - mu)(X - mu)^T / m + eps * I,    y = Sigma^{-1/2} (X - mu),

followed by a per-channel affine transform ``gamma * y + beta``. Before the affine transform the
output covariance is ``Sigma^{-1/2} (Sigma - eps I) Sigma^{-1/2} = I - eps * Sigma^{-1}``.

The inverse square root and its backward come from one of three backends, defined in
``inverse_sqrt``: ``svd`` (truncated-series backward, the meta-layer of arXiv 2207.02119),
``mpa`` (Pade approximant, Song et al., ICLR 2022, arXiv 2201.08663) and ``exact``
(Daleckii-Krein backward).
"""
import itertools
import math
from typing import Iterable

import torch
from torch import Tensor, nn

BACKENDS = ('svd', 'mpa', 'exact')

# Terms of the geometric series that replaces 1/(l_i - l_j) in the `svd` backward.
TAYLOR_TERMS = 9
# Coupled Newton-Schulz steps that solve the Lyapunov equation in the `mpa` backward.
LYAPUNOV_STEPS = 8
# [5/5] Pade approximant p(z)/q(z) of (1 - z)^{1/2}, coefficients of z^0 ... z^5. They solve
# q(z) (1 - z)^{1/2} - p(z) = O(z^11) with q(0) = 1, and scipy.interpolate.pade on the Taylor
# series reproduces them. All roots of p and q lie in (1, 50), so p(Z) and q(Z) are invertible for
# every Z with spectrum in [0, 1).
PADE_P = (1.0, -11 / 4, 11 / 4, -77 / 64, 55 / 256, -11 / 1024)
PADE_Q = (1.0, -9 / 4, 7 / 4, -35 / 64, 15 / 256, -1 / 1024)
# Eigenvalues of Sigma - eps*I at or below this fraction of the largest count as zero: float32
# accumulation over ~1e5 columns leaves round-off of about 1e-6 of the largest eigenvalue.
RANK_TOL = 1e-5


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.mT)


def _eigh_spd(Sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecompose a symmetric positive definite Sigma, eigenvalues ascending.

    Eigenvalues are clamped at 1e-12 of the largest, so round-off cannot turn a small positive
    one into zero or a negative value. With the layer's eps*I added, the clamp acts only when
    l_max exceeds 1e12 * eps.
    """
    lam, Q = torch.linalg.eigh(_sym(Sigma))
    lam = torch.maximum(lam, 1e-12 * lam[..., -1:].abs())
    return lam, Q


def _spectral_backward(Q: Tensor, P: Tensor, grad_S: Tensor) -> Tensor:
    """Gradient of S = Q f(Lambda) Q^T: Q (P o (Q^T sym(dS) Q)) Q^T, P the divided differences."""
    return Q @ (P * (Q.mT @ _sym(grad_S) @ Q)) @ Q.mT


def _taylor_divided_differences(lam: Tensor, terms: int = TAYLOR_TERMS) -> Tensor:
    """Approximate divided differences of f(l) = l^{-1/2} with 1/(l_i - l_j) truncated.

    For l_i > l_j, 1/(l_i - l_j) = (1/l_i) * sum_{k>=0} (l_j/l_i)^k is cut after k = terms, so
    two equal eigenvalues give (terms + 1)/l_i instead of infinity. The sign follows the index
    order of the ascending eigenvalues, which keeps the matrix of factors antisymmetric.
    """
    n = lam.shape[-1]
    f = lam.rsqrt()
    lam_i, lam_j = lam.unsqueeze(-1), lam.unsqueeze(-2)
    upper = torch.ones(n, n, dtype=torch.bool, device=lam.device).triu(1)
    lam_hi = torch.where(upper, lam_j, lam_i)        # the larger of l_i, l_j (ascending order)
    lam_lo = torch.where(upper, lam_i, lam_j)
    ratio = (lam_lo / lam_hi).clamp(max=1.0)
    series = torch.ones_like(ratio)
    for _ in range(terms):                           # Horner: 1 + r (1 + r (1 + ...))
        series = 1.0 + ratio * series
    inv_gap = torch.where(upper, -series, series) / lam_hi       # ~ 1/(l_i - l_j)
    P = (f.unsqueeze(-1) - f.unsqueeze(-2)) * inv_gap
    diagonal = -0.5 * f / lam                                    # f'(l) = -l^{-3/2}/2
    return P.diagonal_scatter(diagonal, dim1=-2, dim2=-1)


def _exact_divided_differences(lam: Tensor) -> Tensor:
    """Divided differences of f(l) = l^{-1/2}: -1/(s_i s_j (s_i + s_j)) with s = sqrt(l).

    The diagonal, -1/(2 s_i^3), is f'(l_i), so no difference of eigenvalues is ever divided by.
    """
    s = lam.sqrt()
    s_i, s_j = s.unsqueeze(-1), s.unsqueeze(-2)
    return -1.0 / (s_i * s_j * (s_i + s_j))


class _EigInverseSqrtTaylor(torch.autograd.Function):
    """Sigma^{-1/2} = Q diag(l^{-1/2}) Q^T with the truncated-series backward (`svd`)."""

    @staticmethod
    def forward(ctx, Sigma):
        lam, Q = _eigh_spd(Sigma)
        ctx.save_for_backward(lam, Q)
        ctx.mark_non_differentiable(lam)
        return (Q * lam.rsqrt().unsqueeze(-2)) @ Q.mT, lam

    @staticmethod
    def backward(ctx, grad_S, grad_lam):
        lam, Q = ctx.saved_tensors
        return _spectral_backward(Q, _taylor_divided_differences(lam), grad_S)


class _EigInverseSqrtExact(_EigInverseSqrtTaylor):
    """The same forward with the Daleckii-Krein backward (`exact`)."""

    @staticmethod
    def backward(ctx, grad_S, grad_lam):
        lam, Q = ctx.saved_tensors
        return _spectral_backward(Q, _exact_divided_differences(lam), grad_S)


def _matrix_polynomial(Z: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """Evaluate sum_k c_k Z^k by Horner's rule (Z is (..., n, n))."""
    eye = torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device)
    result = coefficients[-1] * eye
    for c in reversed(coefficients[:-1]):
        result = Z @ result + c * eye
    return result


def solve_lyapunov_newton_schulz(R: Tensor, C: Tensor, steps: int = LYAPUNOV_STEPS) -> Tensor:
    """Solve R X + X R = C for symmetric positive definite R by coupled Newton-Schulz steps.

    X is read off the matrix sign function of [[R, C], [0, -R]], which is [[I, 2X], [0, -I]]
    (Song et al., ICLR 2022, arXiv 2201.08663). With B_0 = R/||R||_F, C_0 = C/||R||_F:

        B_{k+1} = B_k (3I - B_k^2) / 2,
        C_{k+1} = (-B_k^2 C_k + B_k C_k B_k + C_k (3I - B_k^2)) / 2,    X = lim C_k / 2.

    The iteration converges when the spectrum of B_0 is in (0, sqrt(3)), but an eigenvalue b of
    B_0 needs about log_{1.5}(1/b) steps, so a fixed step count is accurate only for a
    well-conditioned R.
    """
    scale = torch.linalg.matrix_norm(R).unsqueeze(-1).unsqueeze(-1)
    B, Ck = R / scale, C / scale
    eye3 = 3.0 * torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    for _ in range(steps):
        B2 = B @ B
        Ck = 0.5 * (-B2 @ Ck + B @ Ck @ B + Ck @ (eye3 - B2))
        B = 0.5 * B @ (eye3 - B2)
    return 0.5 * Ck


class _PadeInverseSqrt(torch.autograd.Function):
    """Sigma^{-1/2} from the [5/5] Pade approximant, Lyapunov backward (`mpa`)."""

    @staticmethod
    def forward(ctx, Sigma):
        Sigma = _sym(Sigma)
        norm = torch.linalg.matrix_norm(Sigma).unsqueeze(-1).unsqueeze(-1)   # (..., 1, 1)
        eye = torch.eye(Sigma.shape[-1], dtype=Sigma.dtype, device=Sigma.device)
        Z = eye - Sigma / norm
        P, Q = _matrix_polynomial(Z, PADE_P), _matrix_polynomial(Z, PADE_Q)
        # Sigma^{1/2} ~ ||Sigma||^{1/2} q(Z)^{-1} p(Z), so its inverse takes one solve.
        S = _sym(torch.linalg.solve(P, Q)) / norm.sqrt()
        R = _sym(torch.linalg.solve(Q, P)) * norm.sqrt()
        ctx.save_for_backward(S, R)
        return S

    @staticmethod
    def backward(ctx, grad_S):
        S, R = ctx.saved_tensors
        # S = R^{-1} gives dl/dR = -S (dl/dS) S, then R X + X R = dl/dR gives X = dl/dSigma.
        grad_R = -S @ _sym(grad_S) @ S
        return _sym(solve_lyapunov_newton_schulz(R, grad_R))


def _grouped_affine(A: Tensor, X: Tensor, b: Tensor) -> Tensor:
    """Return A X + b per sample: A (G, n, n), X (N, G, n, m), b (G, n, 1) -> (N, G, n, m).

    For n <= m, torch.baddbmm on A and b repeated per sample adds b inside the product, which
    saves a pass over the output, and the copies of A are at most as large as X. For n > m the
    copies would outweigh that, and a broadcast matmul was faster on a CPU (torch 2.14).
    """
    N, G, n, m = X.shape
    if n > m:
        return torch.matmul(A, X) + b
    A_rep = A.expand(N, G, n, n).reshape(N * G, n, n)
    b_rep = b.expand(N, G, n, 1).reshape(N * G, n, 1)
    return torch.baddbmm(b_rep, A_rep, X.reshape(N * G, n, m)).reshape(X.shape)


class _RawMoments(torch.autograd.Function):
    """sum_b X_b X_b^T and sum_b X_b 1 over the batch axis and positions of X (N, G, n, m).

    The backward, dX_b = (dM + dM^T) X_b + ds 1^T, takes one product (with the addition fused
    when n <= m), where autograd of X X^T and of the sum takes two products and two additions.
    """

    @staticmethod
    def forward(ctx, X):
        ctx.save_for_backward(X)
        sum_xx = torch.matmul(X, X.transpose(-1, -2)).sum(0)                 # (G, n, n)
        return sum_xx, X.sum(dim=(0, 3)).unsqueeze(-1)                       # (G, n, 1)

    @staticmethod
    def backward(ctx, grad_M, grad_s):
        X, = ctx.saved_tensors
        return _grouped_affine(grad_M + grad_M.mT, X, grad_s)


def _inverse_sqrt_and_eigvals(Sigma: Tensor, backend: str) -> tuple[Tensor, Tensor | None]:
    """Return Sigma^{-1/2} and, for the eigendecomposition backends, the eigenvalues."""
    _check_backend(backend)
    if backend == 'mpa':
        return _PadeInverseSqrt.apply(Sigma), None
    function = _EigInverseSqrtTaylor if backend == 'svd' else _EigInverseSqrtExact
    return function.apply(Sigma)


def inverse_sqrt(Sigma: Tensor, backend: str = 'svd') -> Tensor:
    """Compute Sigma^{-1/2} of a symmetric positive definite (G, n, n) or (n, n) matrix.

    Every backend first symmetrises the input as (Sigma + Sigma^T)/2. Pass float64.
    Backends:

    * ``svd``: Sigma = Q diag(l) Q^T, S = Q diag(f(l)) Q^T with f(l) = l^{-1/2}. The backward
      is the usual eigendecomposition gradient (through dl/dQ and dl/dl), collected as
      dl/dSigma = Q (P o (Q^T sym(dl/dS) Q)) Q^T with P_ii = f'(l_i) and, for i != j,
      P_ij = (f(l_i) - f(l_j)) * k_ij. Here k_ij replaces 1/(l_i - l_j) by the K = 9 series
      (1/l_i) sum_{k=0}^{K} (l_j/l_i)^k for l_i > l_j (and k_ji = -k_ij). Equal eigenvalues
      give k_ij = (K+1)/l_i, never infinity, and each P_ij has relative error
      (l_j/l_i)^{K+1}.
    * ``mpa``: with Z = I - Sigma/||Sigma||_F and p/q the [5/5] Pade approximant of
      (1 - z)^{1/2}, S = ||Sigma||_F^{-1/2} p(Z)^{-1} q(Z). The backward goes through
      R = Sigma^{1/2}: dl/dR = -S (dl/dS) S, then R X + X R = dl/dR is solved for
      X = dl/dSigma by 8 coupled Newton-Schulz steps. Both are accurate only for a
      well-conditioned Sigma.
    * ``exact``: the same forward as ``svd``, with the Daleckii-Krein divided differences of
      f(l) = l^{-1/2}, P_ij = -1/(s_i s_j (s_i + s_j)) with s = sqrt(l): the true derivative.
    """
    return _inverse_sqrt_and_eigvals(Sigma, backend)[0]


def _condition_from_eigvals(lam: Tensor, eps: float) -> Tensor:
    """Stack (kappa, kappa_raw, rank) of eigenvalues lam (G, n), the worst group's each."""
    lam_raw = lam - eps
    kappa = (lam[..., -1] / lam[..., 0]).max()
    top_raw = lam_raw[..., -1]
    kappa_raw = torch.where(lam_raw[..., 0] > 0, top_raw / lam_raw[..., 0],
                            torch.full_like(top_raw, math.inf)).max()
    rank = (lam_raw > RANK_TOL * top_raw.unsqueeze(-1)).sum(-1).min()
    return torch.stack([kappa, kappa_raw, rank.to(lam.dtype)])


def covariance_condition(Sigma: Tensor, eps: float) -> dict:
    """Return the condition of a covariance Sigma = C + eps*I, (G, n, n) or (n, n).

    The keys are Python numbers computed from float64 eigenvalues:

    * ``kappa``: l_max/l_min of Sigma, the condition number plotted over training in
      arXiv 2207.02119;
    * ``kappa_raw``: the same of C = Sigma - eps*I, or ``inf`` when round-off leaves its
      smallest eigenvalue at or below zero;
    * ``rank``: the number of eigenvalues of C above 1e-5 * l_max(C).

    Over several groups, kappa and kappa_raw are the largest value and rank the smallest.
    """
    with torch.no_grad():
        lam = torch.linalg.eigvalsh(_sym(Sigma.detach().double()))
        kappa, kappa_raw, rank = _condition_from_eigvals(lam, eps).tolist()
    return {'kappa': kappa, 'kappa_raw': kappa_raw, 'rank': int(rank)}


class ZCANormBatch(nn.Module):
    """Decorrelated batch norm with ZCA whitening (Huang et al., CVPR 2018, arXiv 1804.08450).

    Input (N, C, *) with C = groups * n. Per group, in training mode,

        mu = mean of x over N and the spatial axes,   (n, 1)
        Sigma = (x - mu)(x - mu)^T / (N*H*W) + eps * I,   (n, n)
        y = gamma * Sigma^{-1/2} (x - mu) + beta,

    and in evaluation mode the running averages (momentum 0.1) of mu and of the whitening matrix
    Sigma^{-1/2} replace the batch ones. ``momentum=None`` gives the cumulative average, as in
    ``nn.BatchNorm2d``. Before the affine transform the output covariance is
    I - eps * Sigma^{-1}, the identity only as eps -> 0.

    Precision: the raw moments sum(x) and sum(x x^T) are accumulated in float32 (float64 for a
    float64 input) with autocast disabled, because bf16 or fp16 sums of ~1e5 products lose the
    small eigenvalues that the whitening amplifies. The centring, Sigma^{-1/2} and its backward
    are float64 (the matrices are n x n), and the output is cast back to the input dtype.
    The moments are taken about the running mean, which keeps the float32 cancellation in
    sum(x x^T)/m - mu mu^T small once the running mean tracks the data.

    After each training forward, ``last_stats`` holds, from the float64 eigenvalues and
    without grad: kappa, kappa_raw, rank (see ``covariance_condition``) and
    ``whitening_residual`` = ||S Sigma S - I||_F / sqrt(n), max over groups, with S the
    computed Sigma^{-1/2}: a large value means the matrix function is inaccurate.

    NOTE: the published implementation passes the (G, n, n) covariance to a matrix square
    root written for 2-D matrices, so training fails at the first step, and it then inverts
    the square root. Here each backend works on a batch of groups and returns Sigma^{-1/2}
    directly.
    """

    def __init__(self, num_features: int, groups: int = 1, eps: float = 1e-2,
                 momentum: float | None = 0.1, affine: bool = True, backend: str = 'svd'):
        super().__init__()
        _check_backend(backend)
        if groups < 1 or num_features % groups != 0:
            raise ValueError(f"num_features={num_features} is not divisible by "
                             f"groups={groups}: choose groups that divide it")
        self.num_features, self.groups = num_features, groups
        self.eps, self.momentum, self.affine, self.backend = eps, momentum, affine, backend
        n = num_features // groups
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter('weight', None)
            self.register_parameter('bias', None)
        self.register_buffer('running_mean', torch.zeros(groups, n, 1))
        self.register_buffer('running_whitening', torch.eye(n).expand(groups, n, n).clone())
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))
        self._stats: Tensor | None = None
        self._recompute: dict | None = None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, backend={self.backend!r}")

    def reset_running_stats(self) -> None:
        """Reset the running mean to 0, the running whitening to I and the batch count."""
        n = self.num_features // self.groups
        self.running_mean.zero_()
        self.running_whitening.copy_(torch.eye(n).expand_as(self.running_whitening))
        self.num_batches_tracked.zero_()

    @property
    def last_stats(self) -> dict:
        """Statistics of the latest training forward ({} before the first one)."""
        if self._stats is None:
            return {}
        kappa, kappa_raw, rank, residual = self._stats.tolist()   # one device sync
        return {'kappa': kappa, 'kappa_raw': kappa_raw, 'rank': int(rank),
                'whitening_residual': residual}

    def _reduce_moments(self, count: int, sum_x: Tensor,
                        sum_xx: Tensor) -> tuple[int, Tensor, Tensor]:
        """Combine raw moments across processes before centring; the identity here.

        sum_x (G, n, 1) and sum_xx (G, n, n) are taken about the running mean, which all
        processes share, so a distributed version can all-reduce the three values as they are.
        """
        return count, sum_x, sum_xx

    def forward(self, x: Tensor) -> Tensor:
        N, C = x.shape[:2]
        if C != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input {tuple(x.shape)}")
        G, n = self.groups, C // self.groups
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            # Shifting by the running mean changes no result, only the float32 round-off.
            xg = x.to(dtype).reshape(N, G, n, -1) - self.running_mean.to(dtype)  # (N, G, n, HW)
            if self.training:
                whitening, shift = self._batch_whitening(xg)
            else:
                whitening = self.running_whitening.to(torch.float64)
                shift = torch.zeros_like(self.running_mean, dtype=torch.float64)
            # y = gamma * S (x - mu) + beta = (gamma * S) x_shifted + (beta - gamma * S d).
            bias = -(whitening @ shift)                                          # (G, n, 1)
            if self.affine:
                gamma = self.weight.reshape(G, n, 1).to(torch.float64)
                whitening = gamma * whitening
                bias = gamma * bias + self.bias.reshape(G, n, 1)
            y = _grouped_affine(whitening.to(dtype), xg, bias.to(dtype))        # (N, G, n, HW)
        return y.reshape(x.shape).to(x.dtype)

    def _batch_whitening(self, xg: Tensor) -> tuple[Tensor, Tensor]:
        """Return the batch whitening matrix S (G, n, n) and mean d (G, n, 1) of xg, float64."""
        N, G, n, HW = xg.shape
        count = N * HW
        sum_xx, sum_x = _RawMoments.apply(xg)                                # (G, n, n), (G, n, 1)
        count, sum_x, sum_xx = self._reduce_moments(count, sum_x, sum_xx)
        d = sum_x.double() / count
        cov = sum_xx.double() / count - d @ d.mT
        eye = torch.eye(n, dtype=torch.float64, device=xg.device)
        Sigma = cov + self.eps * eye
        S, lam = _inverse_sqrt_and_eigvals(Sigma, self.backend)
        with torch.no_grad():
            self._update_stats(Sigma.detach(), S.detach(), lam)
            if self._recompute is not None:
                self._accumulate(count, d.detach(), cov.detach())
            else:
                self._update_running(d.detach(), S.detach())
        return S, d

    def _update_stats(self, Sigma: Tensor, S: Tensor, lam: Tensor | None) -> None:
        if lam is None:
            lam = torch.linalg.eigvalsh(Sigma)
        n = Sigma.shape[-1]
        eye = torch.eye(n, dtype=Sigma.dtype, device=Sigma.device)
        residual = torch.linalg.matrix_norm(S @ Sigma @ S - eye).max() / math.sqrt(n)
        self._stats = torch.cat([_condition_from_eigvals(lam, self.eps), residual.reshape(1)])

    def _update_running(self, d: Tensor, S: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        mean = self.running_mean.double() + d
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_whitening.lerp_(S.to(self.running_whitening.dtype), factor)

    def _begin_recompute(self) -> None:
        self._recompute = {'batches': 0, 'count': 0, 'mean': None, 'scatter': None}

    def _accumulate(self, count: int, d: Tensor, cov: Tensor) -> None:
        """Merge one batch's mean and covariance into the float64 totals.

        With scatter M = count * covariance, two parts a and b combine exactly as
        M = M_a + M_b + delta delta^T * n_a n_b / (n_a + n_b), delta = mu_b - mu_a.
        """
        acc = self._recompute
        mean = self.running_mean.double() + d
        scatter = cov * count                          # sum of centred outer products
        if acc['mean'] is None:
            acc.update(count=count, mean=mean, scatter=scatter)
        else:
            total = acc['count'] + count
            delta = mean - acc['mean']
            acc['scatter'] = acc['scatter'] + scatter + delta @ delta.mT * (acc['count'] * count
                                                                              / total)
            acc['mean'] = acc['mean'] + delta * (count / total)
            acc['count'] = total
        acc['batches'] += 1

    def _finish_recompute(self) -> None:
        """Set the running mean and whitening from the accumulated full-data moments."""
        acc, self._recompute = self._recompute, None
        if acc is None or acc['mean'] is None:
            return
        n = self.num_features // self.groups
        eye = torch.eye(n, dtype=torch.float64, device=acc['mean'].device)
        S = inverse_sqrt(acc['scatter'] / acc['count'] + self.eps * eye, self.backend)
        self.running_mean.copy_(acc['mean'])
        self.running_whitening.copy_(S)
        self.num_batches_tracked.fill_(acc['batches'])


def meta_layers(model: nn.Module) -> list[ZCANormBatch]:
    """Return every ZCANormBatch in model, in module order."""
    return [m for m in model.modules() if isinstance(m, ZCANormBatch)]


def recompute_norm_statistics(model: nn.Module, inputs: Iterable[Tensor],
                              device: torch.device) -> None:
    """Recompute the running statistics of every norm layer at the current weights.

    Every ``_BatchNorm`` is reset and put in train mode with cumulative averaging
    (momentum=None), as ``torch.optim.swa_utils.update_bn`` does. Every ZCANormBatch
    accumulates the exact full-data mean and covariance over the pass in float64 and then sets
    running_mean = mu and running_whitening = (Sigma + eps*I)^{-1/2}. One no-grad pass runs
    over ``inputs`` (tensors, or tuples whose first item is the input batch, as from a
    DataLoader). Only the norm layers switch to train mode, so dropout stays as it was. The
    momentum and train/eval mode of every layer are restored afterwards.

    NOTE: during the pass the meta-layer whitens each batch with that batch's statistics, so the
    batch norms after it see slightly different features from those in evaluation mode.

    Raises ValueError when ``inputs`` is empty, before any statistics are changed.
    """
    batches = iter(inputs)
    first = next(batches, None)
    if first is None:
        raise ValueError("recompute_norm_statistics needs at least one input batch")
    norms = [m for m in model.modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, ZCANormBatch))]
    saved = [(m, m.training, m.momentum) for m in norms]
    try:
        for m in norms:
            m.train()
            if isinstance(m, ZCANormBatch):
                m._begin_recompute()
            else:
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            for batch in itertools.chain([first], batches):
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                model(batch.to(device))
        for m in meta_layers(model):
            m._finish_recompute()
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum
            if isinstance(m, ZCANormBatch):
                m._recompute = None
