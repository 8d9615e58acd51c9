"""Disentanglement regularisers compared with NOG and OLR: OroJaR and the Hessian Penalty.

Both are estimated with finite differences along Rademacher directions ``v`` (entries +1 or
-1) and act on a list of layer outputs ``h(z)`` (the generator's first five layers in
training). ``h`` is any callable from codes (N, nz) to a list of tensors with first
dimension N, so the tests can pass linear and quadratic maps with known closed forms.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LayerFn = Callable[[Tensor], list[Tensor]]


def rademacher_like(z: Tensor, num_samples: int) -> Tensor:
    """Rademacher samples (k, N, nz) with entries -1 or +1, each with probability 1/2."""
    v = torch.randint(0, 2, (num_samples, *z.shape), device=z.device)
    return v.to(z.dtype) * 2 - 1


def _layers_at(h: LayerFn, z: Tensor, v: Tensor, scale: float) -> list[Tensor]:
    # One batched call for all k perturbations: (k*N, nz) in, outputs reshaped to (k, N, ...).
    k, N = v.shape[:2]
    outputs = h((z.unsqueeze(0) + scale * v).reshape(k * N, -1))
    return [out.reshape(k, N, *out.shape[1:]) for out in outputs]


def orojar_penalty(h: LayerFn, z: Tensor, epsilon: float = 0.1, num_samples: int = 2) -> Tensor:
    """Orthogonal Jacobian regularisation (Wei et al., ICCV 2021, arXiv 2108.07668).

    For each layer output ``h(z)`` and Rademacher ``v``, ``d_v = (h(z + eps v) - h(z)) / eps``
    approximates ``J v``. Because ``||J v||^2 = sum_ij (J^T J)_ij v_i v_j``, the variance over
    ``v`` of ``||d_v||^2`` is ``2 sum_{i != j} ((J^T J)_ij)^2``: zero exactly when the columns
    of the Jacobian are orthogonal. The penalty is the unbiased variance (divisor k - 1) over
    the ``k = num_samples`` samples, averaged over the batch and then over the layers.
    For a linear ``h(z) = A z`` its expectation is ``2 sum_{i != j} ((A^T A)_ij)^2``.
    """
    if num_samples < 2:
        raise ValueError(f"the variance needs at least 2 Rademacher samples, got {num_samples}")
    v = rademacher_like(z, num_samples)  # (k, N, nz)
    base = h(z)
    shifted = _layers_at(h, z, v, epsilon)
    penalties = []
    for h0, h1 in zip(base, shifted):
        d = (h1 - h0.unsqueeze(0)) / epsilon  # (k, N, ...)
        sq_norm = d.flatten(2).pow(2).sum(2)  # (k, N)
        penalties.append(sq_norm.var(dim=0, unbiased=True).mean())
    return torch.stack(penalties).mean()


def hessian_penalty(h: LayerFn, z: Tensor, epsilon: float = 0.1,
                    num_samples: int = 2) -> Tensor:
    """Hessian Penalty (Peebles et al., ECCV 2020, arXiv 2008.10599).

    For each output element ``h_o`` and Rademacher ``v``, the second difference
    ``(h_o(z + eps v) - 2 h_o(z) + h_o(z - eps v)) / eps^2`` approximates ``v^T H_o v``. Its
    variance over ``v`` is ``2 sum_{i != j} ((H_o)_ij)^2``, zero when the Hessian is diagonal.
    The penalty is the unbiased variance (divisor k - 1) over the ``k`` samples, then the
    maximum over all output elements and the batch (as in the reference implementation of
    Peebles et al.), averaged over the layers. For a quadratic ``h_o(z) = z^T B_o z`` the
    second difference is exactly ``v^T (B_o + B_o^T) v``.
    """
    if num_samples < 2:
        raise ValueError(f"the variance needs at least 2 Rademacher samples, got {num_samples}")
    v = rademacher_like(z, num_samples)  # (k, N, nz)
    base = h(z)
    plus = _layers_at(h, z, v, epsilon)
    minus = _layers_at(h, z, v, -epsilon)
    penalties = []
    for h0, hp, hm in zip(base, plus, minus):
        second = (hp - 2 * h0.unsqueeze(0) + hm) / epsilon ** 2  # (k, N, ...)
        penalties.append(second.var(dim=0, unbiased=True).max())
    return torch.stack(penalties).mean()


REGULARIZERS = {'orojar': orojar_penalty, 'hp': hessian_penalty}
