"""Orthogonality techniques for the layer that feeds an SVD meta-layer (the pre-SVD layer).

Song, Sebe and Wang, "Improving Covariance Conditioning of the SVD Meta-layer by
Orthogonality", ECCV 2022 (arXiv 2207.02119), and "Orthogonal SVD Covariance Conditioning and
Latent Disentanglement", IEEE TPAMI 2023 (arXiv 2212.05599).

The pre-SVD layer's weight ``W`` and its gradient ``L = d loss / dW`` are treated as matrices
with one row per output unit, ``W.reshape(W.shape[0], -1)``. Two techniques act on them:

- nearest orthogonal gradient (NOG): ``L = U S V^T`` is replaced by its polar factor ``U V^T``;
- optimal learning rate (OLR): the pre-SVD layer's parameter group gets the rate
  ``eta* = a b / (a c + 2 b^2)`` with ``a = w.w``, ``b = l.w``, ``c = l.l``.

``OrthogonalUpdate`` applies both between ``backward()`` and ``optimizer.step()``.

NOTE: the published implementation built the OLR parameter group by matching parameter names
after the model had been wrapped (``module.`` prefixes), so the group was empty and OLR changed
nothing. Here every group is chosen by parameter identity (``split_param_groups``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

NOG_METHODS = ('svd', 'newton_schulz')


def _as_matrix(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _polar_from_gram(L: Tensor, rank_tol: float) -> tuple[Tensor, int]:
    """Polar factor of a float64 matrix from the eigendecomposition of its smaller Gram matrix."""
    m, n = L.shape
    wide = m <= n
    gram = L @ L.T if wide else L.T @ L  # (min(m, n), min(m, n))
    eigenvalues, Q = torch.linalg.eigh(gram)
    lam_max = eigenvalues[-1].clamp_min(0)
    # A singular value s_i > rank_tol * s_max is an eigenvalue s_i^2 > rank_tol^2 * s_max^2.
    # float64 resolves eigenvalues down to about 1e-16 * lam_max, which is why the Gram
    # matrix is formed in float64 even for a float32 gradient.
    keep = eigenvalues > (rank_tol ** 2) * lam_max
    rank = int(keep.sum())
    if rank == 0:
        return torch.zeros_like(L), 0
    Q_r = Q[:, keep]                                     # (min(m, n), r)
    inv_sqrt = eigenvalues[keep].rsqrt()                 # (r,)
    if wide:
        # (L L^T)^{-1/2} L restricted to the range: Q_r diag(lam^{-1/2}) Q_r^T L
        return Q_r @ (inv_sqrt[:, None] * (Q_r.T @ L)), rank
    # L (L^T L)^{-1/2} restricted to the range: L Q_r diag(lam^{-1/2}) Q_r^T
    return ((L @ Q_r) * inv_sqrt) @ Q_r.T, rank


def _polar_newton_schulz(L: Tensor, max_iters: int) -> tuple[Tensor, int]:
    """Polar factor by the cubic Newton-Schulz iteration, on the wide orientation of L."""
    X = L.T if L.shape[0] > L.shape[1] else L            # (m, n) with m <= n
    X = X / torch.linalg.matrix_norm(X)
    eye = torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
    error = torch.linalg.matrix_norm(X @ X.T - eye)
    for _ in range(max_iters):
        X_next = 1.5 * X - 0.5 * (X @ X.T) @ X
        error_next = torch.linalg.matrix_norm(X_next @ X_next.T - eye)
        # The error falls monotonically in exact arithmetic, because every singular value of
        # X lies in (0, 1] and the map s -> 1.5 s - 0.5 s^3 moves it towards 1. Once it
        # stops falling, round-off dominates and the previous iterate is the best one.
        if not error_next < error:
            break
        X, error = X_next, error_next
    # Converged singular values are 1 or 0, so the squared Frobenius norm counts the ones.
    rank = int(round(float(torch.linalg.matrix_norm(X) ** 2)))
    return (X.T if L.shape[0] > L.shape[1] else X), rank


def nearest_orthogonal(L: Tensor, method: str = 'svd', rank_tol: float = 1e-6,
                       max_iters: int = 50) -> tuple[Tensor, int]:
    """Return the orthogonal polar factor ``U V^T`` of a 2-D matrix ``L`` and its numerical rank.

    Nearest orthogonal gradient, Song et al. (arXiv 2207.02119, 2212.05599). For the thin SVD
    ``L = U S V^T`` of an ``(m, n)`` matrix, ``Q = U V^T`` minimises ``||L - Q||_F`` over all
    matrices with orthonormal rows (``m <= n``) or orthonormal columns (``m > n``). No
    rescaling is applied.

    ``method='svd'`` gives the exact factor ``U V^T`` without computing an SVD:

        Q = (L L^T)^{-1/2} L   if m <= n,        Q = L (L^T L)^{-1/2}   otherwise,

    with the inverse square root of the small Gram matrix taken from its float64
    eigendecomposition, followed by one product. A rank-deficient ``L`` has no unique nearest
    orthogonal matrix. The function then returns the partial isometry ``U_r V_r^T`` over the
    singular values above ``rank_tol * s_max`` (Gram eigenvalues above
    ``rank_tol^2 * lambda_max``), whose singular values are ``r`` ones and zeros.

    ``method='newton_schulz'`` starts from ``X_0 = L / ||L||_F`` and iterates
    ``X <- 1.5 X - 0.5 X X^T X`` (on ``X^T`` for a tall ``L``) until ``||X X^T - I||_F`` stops
    falling, or for ``max_iters`` steps. This cubic iteration converges to ``U V^T``, unlike
    quintic iterations tuned for speed, which leave the singular values only near 1. It runs
    in float32 (float64 for a float64 ``L``). Its rank is the rounded
    ``||X||_F^2``, the number of singular values that reached 1, so singular values too small
    to converge within ``max_iters`` steps are not counted.

    Args:
        L: ``(m, n)`` real matrix, finite.
        method: one of ``NOG_METHODS``.
        rank_tol: relative threshold on the singular values (``svd`` only).
        max_iters: maximum number of Newton-Schulz steps.

    Returns:
        ``(Q, r)``: ``Q`` of the shape, dtype and device of ``L``, and the rank as an int. An
        all-zero ``L`` gives zeros and rank 0.

    Raises:
        ValueError: ``L`` is not 2-D, is not finite, or ``method`` is unknown.
    """
    if L.ndim != 2:
        raise ValueError(f"nearest_orthogonal expects a 2-D matrix, got shape {tuple(L.shape)}")
    if method not in NOG_METHODS:
        raise ValueError(f"unknown NOG method {method!r}; expected one of {NOG_METHODS}")
    if not bool(torch.isfinite(L).all()):
        raise ValueError("nearest_orthogonal: L contains NaN or Inf")
    if not bool(L.any()):
        return torch.zeros_like(L), 0
    L = L.detach()
    if method == 'svd':
        Q, rank = _polar_from_gram(L.double(), rank_tol)
    else:
        work_dtype = torch.promote_types(L.dtype, torch.float32)
        Q, rank = _polar_newton_schulz(L.to(work_dtype), max_iters)
    return Q.to(L.dtype), rank


def optimal_learning_rate(weight: Tensor, grad: Tensor, base_lr: float) -> tuple[float, bool]:
    """Return the pre-SVD layer's learning rate and whether the OLR estimate was used.

    Optimal learning rate, Song et al. (arXiv 2207.02119, 2212.05599). With ``w = vec(W)`` and
    ``l = vec(L)`` (the gradient after NOG when both are on), a plain SGD step gives
    ``w - eta l``, and the squared Gram term of the updated weight is

        g(eta) = ((w - eta l)^T (w - eta l))^2 = (a - 2 b eta + c eta^2)^2,
        a = w.w,  b = l.w,  c = l.l.

    Its derivative is ``g'(eta) = 2 (a - 2 b eta + c eta^2)(2 c eta - 2 b)``. Keeping only its
    terms of order 0 and 1 in ``eta``, ``-4 a b + (4 a c + 8 b^2) eta``, and solving for zero
    gives

        eta* = a b / (a c + 2 b^2).

    This is a first-order estimate, not the exact minimiser of ``g``. It is used when
    ``0 < eta* < base_lr``. Otherwise, and when ``eta*`` is undefined (zero gradient, or
    ``l`` orthogonal to ``w`` so that ``b = 0``), the rate is ``base_lr``. The dot products
    are taken in float64. Reading them back is one host-device synchronisation on a GPU.

    Returns:
        ``(lr, used)``: ``lr`` is a Python float, and ``used`` is True when it is ``eta*``.
    """
    w = weight.detach().reshape(-1).double()
    l = grad.detach().reshape(-1).double()
    a, b, c = (float(v) for v in torch.stack([w @ w, l @ w, l @ l]).cpu())
    denominator = a * c + 2.0 * b * b
    if not (math.isfinite(denominator) and denominator > 0.0):
        return float(base_lr), False
    eta = a * b / denominator
    if math.isfinite(eta) and 0.0 < eta < base_lr:
        return eta, True
    return float(base_lr), False


def orthogonality_error(W: Tensor) -> float:
    """Return the distance of a weight from (semi-)orthogonality as a Python float.

    With ``M = W.reshape(W.shape[0], -1)`` of shape ``(m, n)``, the error is
    ``||M M^T - I_m||_F`` for ``m <= n`` and ``||M^T M - I_n||_F`` otherwise, in float64.
    """
    M = _as_matrix(W.detach()).double()
    m, n = M.shape
    gram = M @ M.T if m <= n else M.T @ M
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return float(torch.linalg.matrix_norm(gram - eye))


def split_param_groups(params: Iterable[nn.Parameter], pre_svd: Sequence[nn.Parameter],
                       **pre_svd_options) -> list[dict]:
    """Split parameters into optimizer groups, one group per pre-SVD parameter.

    Groups are chosen by parameter identity, never by name, so that wrapping the model
    (``nn.DataParallel``, DDP, ``torch.compile``, an ``nn.Sequential``) cannot empty a group.
    OLR sets the learning rate of each pre-SVD group (arXiv 2207.02119), so each group
    contains exactly one parameter.

    Returns:
        ``[{'params': others}, {'params': [p0], 'name': 'pre_svd_0', **pre_svd_options}, ...]``.
        The first group is always present, empty if every parameter is pre-SVD. A parameter
        listed more than once in ``params`` appears once.

    Raises:
        ValueError: a pre-SVD parameter is not among ``params`` or is listed twice.
    """
    params = list(params)
    param_ids = {id(p) for p in params}
    pre_svd_ids = [id(p) for p in pre_svd]
    if len(set(pre_svd_ids)) != len(pre_svd_ids):
        raise ValueError("split_param_groups: a pre-SVD parameter is listed more than once")
    for i, p in enumerate(pre_svd):
        if id(p) not in param_ids:
            raise ValueError(f"split_param_groups: pre-SVD parameter {i} (shape "
                             f"{tuple(p.shape)}) is not among the model's parameters")
    others, seen = [], set(pre_svd_ids)
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            others.append(p)
    groups = [{'params': others}]
    for i, p in enumerate(pre_svd):
        groups.append({'params': [p], 'name': f'pre_svd_{i}', **pre_svd_options})
    return groups


class OrthogonalUpdate:
    """Nearest orthogonal gradient and optimal learning rate for the pre-SVD parameters.

    Song et al. (arXiv 2207.02119, 2212.05599). Call ``apply(base_lr)`` after ``backward()``
    (and after ``GradScaler.unscale_``) and before ``optimizer.step()``:

    1. NOG (``nog=True``): each gradient ``L`` is replaced in place by
       ``nearest_orthogonal(L.reshape(L.shape[0], -1))``, the polar factor ``U V^T``. If any
       pre-SVD gradient is None, all zero, or contains NaN or Inf, no gradient is changed,
       ``skipped`` grows by one and ``apply`` returns False. The caller then skips
       ``optimizer.step()`` for this iteration. Rank-deficient gradients get the partial
       isometry ``U_r V_r^T`` and are counted in ``rank_deficient``.
    2. OLR (``olr=True``): each pre-SVD group's ``lr`` becomes
       ``eta* = a b / (a c + 2 b^2)`` when ``0 < eta* < base_lr``, else ``base_lr``
       (see ``optimal_learning_rate``). ``base_lr`` is the current scheduled rate of the
       other groups. A None gradient gives ``base_lr``.

    ``last`` contains ``{'eta': [...], 'eta_used': [...]}`` of the latest call, one entry per
    pre-SVD parameter (empty lists when OLR is off or the step was skipped).

    Raises:
        ValueError: a pre-SVD parameter is in no group of ``optimizer``, or, with ``olr``,
            shares its group with another parameter, or ``nog_method`` is unknown.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, pre_svd: Sequence[nn.Parameter],
                 nog: bool, olr: bool, nog_method: str = 'svd'):
        if nog_method not in NOG_METHODS:
            raise ValueError(f"unknown NOG method {nog_method!r}; expected one of {NOG_METHODS}")
        self.optimizer = optimizer
        self.pre_svd = list(pre_svd)
        self.nog, self.olr, self.nog_method = nog, olr, nog_method
        # Checked here so that a wrong grouping fails before training starts.
        for i, p in enumerate(self.pre_svd):
            self._find_group(i, p)
        self.skipped = 0
        self.rank_deficient = 0
        self.applied = 0
        self.last = {'eta': [], 'eta_used': []}

    def _find_group(self, index: int, p: nn.Parameter) -> dict:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group['params']):
                if self.olr and len(group['params']) != 1:
                    raise ValueError(
                        f"OLR needs pre-SVD parameter {index} alone in its optimizer group, but "
                        f"its group contains {len(group['params'])} parameters; build the groups "
                        f"with split_param_groups")
                return group
        raise ValueError(f"pre-SVD parameter {index} (shape {tuple(p.shape)}) is in no "
                         f"parameter group of the optimizer")

    @staticmethod
    def _usable(grad: Tensor | None) -> bool:
        return grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.any())

    @torch.no_grad()
    def apply(self, base_lr: float) -> bool:
        """Orthogonalise the pre-SVD gradients and set their learning rates.

        Returns True when the optimizer step should go ahead, False when it must be skipped.
        """
        self.last = {'eta': [], 'eta_used': []}
        if self.nog:
            if not all(self._usable(p.grad) for p in self.pre_svd):
                self.skipped += 1
                return False
            for p in self.pre_svd:
                Q, rank = nearest_orthogonal(_as_matrix(p.grad), method=self.nog_method)
                if rank < min(Q.shape):
                    self.rank_deficient += 1
                p.grad.copy_(Q.reshape(p.grad.shape))
        if self.olr:
            # Optimizer.load_state_dict replaces the group dicts, so they are looked up by
            # parameter identity on every call rather than kept from the constructor.
            groups = [self._find_group(i, p) for i, p in enumerate(self.pre_svd)]
            for p, group in zip(self.pre_svd, groups):
                if p.grad is None:
                    eta, used = float(base_lr), False
                else:
                    eta, used = optimal_learning_rate(p, p.grad, base_lr)
                group['lr'] = eta
                self.last['eta'].append(eta)
                self.last['eta_used'].append(used)
        self.applied += 1
        return True

    def state_dict(self) -> dict:
        """Return the counters: steps applied, steps skipped, rank-deficient gradients."""
        return {'applied': self.applied, 'skipped': self.skipped,
                'rank_deficient': self.rank_deficient}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters saved by ``state_dict``."""
        self.applied = int(state['applied'])
        self.skipped = int(state['skipped'])
        self.rank_deficient = int(state['rank_deficient'])
