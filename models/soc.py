"""Skew orthogonal convolution, the orthogonal-weight (OW) option for the pre-SVD layer.

Singla and Feizi, "Skew Orthogonal Convolutions", ICML 2021 (arXiv 2105.11417), with the
spectral-norm bound of Singla and Feizi, "Fantastic Four: Differentiable Bounds on Singular
Values of Convolution Layers", ICLR 2021 (arXiv 1911.10258). Song et al. use it as the
orthogonal pre-SVD convolution (arXiv 2207.02119, 2212.05599).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def transpose_filter(weight: Tensor) -> Tensor:
    """Return the adjoint convolution's filter: channel axes swapped, spatial axes flipped.

    For an odd ``k`` and padding ``k // 2`` (zero or circular), the convolution with
    ``W^T[i, j, u, v] = W[j, i, k-1-u, k-1-v]`` is the adjoint of the convolution with ``W``.
    """
    return weight.transpose(0, 1).flip(2, 3)


def filter_reshapes(weight: Tensor) -> dict[str, Tensor]:
    """Return the four reshapes of an (o, i, k, k) filter used by Fantastic Four (arXiv 1911.10258).

    The keys name rows and columns. ``out_h_by_in_w`` is ``(o*k, i*k)`` with rows ``(out, u)``
    and columns ``(in, v)``, and ``out_w_by_in_h`` is the same with the spatial axes exchanged.
    ``out_by_in_hw`` is ``(o, i*k*k)`` and ``out_hw_by_in`` is ``(o*k*k, i)``. For a stride-1
    convolution with zero or circular padding, each matrix ``R`` gives the bound
    ``||conv_W||_2 <= k * ||R||_2``.
    """
    o, i, kh, kw = weight.shape
    return {
        'out_h_by_in_w': weight.permute(0, 2, 1, 3).reshape(o * kh, i * kw),
        'out_w_by_in_h': weight.permute(0, 3, 1, 2).reshape(o * kw, i * kh),
        'out_by_in_hw': weight.reshape(o, i * kh * kw),
        'out_hw_by_in': weight.permute(0, 2, 3, 1).reshape(o * kh * kw, i),
    }


class SkewOrthogonalConv2d(nn.Module):
    """Orthogonal convolution ``y = exp(A) x`` with a skew-symmetric convolution ``A``.

    Skew Orthogonal Convolution, Singla and Feizi (ICML 2021, arXiv 2105.11417). A free filter
    ``P`` of shape ``(m, m, k, k)``, ``m = max(in, out)``, is skew-symmetrised as

        A = (P - P^T) / 2,   P^T[i, j, u, v] = P[j, i, k-1-u, k-1-v],

    so the convolution with ``A`` (zero padding ``k // 2``) satisfies ``<A x, y> = -<x, A y>``
    and ``exp(A)`` is orthogonal. ``A`` is scaled by ``0.7 / sigma``, where ``sigma`` bounds its
    spectral norm (Fantastic Four, arXiv 1911.10258):

        sigma = sqrt(k * k) * min(||R_1||, ||R_2||, ||R_3||, ||R_4||)

    over the reshapes of ``A`` listed in ``filter_reshapes``. Each ``||R_i||`` is estimated by
    power iteration with its vectors kept as buffers ``u_<name>`` and ``v_<name>``:
    ``init_power_iters`` iterations at construction, one per training forward, none in
    evaluation. Scaling never changes the skew symmetry, so ``exp(A)`` is orthogonal for any
    ``sigma``. A valid bound keeps the truncated series accurate, and a tight one makes it
    converge faster. The output is the truncated Taylor series

        y = sum_{j=0..K} A^j x / j!,   K = train_terms in training, eval_terms in evaluation.

    With ``||A|| <= 0.7`` its remainder is the tail of the series of ``e^0.7`` after the
    ``K``-th term, below ``2e-4 ||x||`` for ``K = 5`` and ``6e-10 ||x||`` for ``K = 10``.

    The input is zero-padded to ``m`` channels and only the first ``out`` output channels are
    kept, so the layer preserves norms when ``out >= in`` and cannot increase them otherwise.
    Stride 2 first moves each 2x2 block into the channels (``F.pixel_unshuffle``, a
    permutation) and then applies the stride-1 layer to ``4 * in`` channels, so there
    ``m = max(4 * in, out)``.

    Shapes: input ``(N, in, H, W)``, output ``(N, out, H / stride, W / stride)``.

    ``weight`` is ``P``, the parameter that NOG and OLR act on under the OW option
    (arXiv 2207.02119).

    NOTE: the published implementation hard-coded ``.cuda()`` in this layer, so it failed on a
    CPU. Here every tensor follows the module's device, and the power-iteration vectors are
    buffers that move with ``.to(device)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, bias: bool = True, train_terms: int = 5,
                 eval_terms: int = 10, init_power_iters: int = 50):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so that the transposed filter is the "
                             f"adjoint, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if min(train_terms, eval_terms) < 1:
            raise ValueError(f"train_terms and eval_terms must be >= 1, got {train_terms} "
                             f"and {eval_terms}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.train_terms, self.eval_terms = train_terms, eval_terms
        inner_in = in_channels * stride * stride
        self.channels = max(inner_in, out_channels)  # m
        m, k = self.channels, kernel_size
        self.weight = nn.Parameter(torch.empty(m, m, k, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        for name, R in filter_reshapes(self.weight.detach()).items():
            self.register_buffer(f'u_{name}', torch.empty(R.shape[0]))
            self.register_buffer(f'v_{name}', torch.empty(R.shape[1]))
        self.reset_parameters(init_power_iters)

    def reset_parameters(self, power_iters: int = 50) -> None:
        """Initialise P as ``nn.Conv2d`` does, the bias to zero, and the power iteration."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        with torch.no_grad():
            for name, R in filter_reshapes(self.skew_filter()).items():
                v = torch.randn(R.shape[1], dtype=R.dtype, device=R.device)
                getattr(self, f'v_{name}').copy_(F.normalize(v, dim=0))
                getattr(self, f'u_{name}').copy_(F.normalize(R @ v, dim=0))
        self.update_power_iteration(power_iters)

    def skew_filter(self) -> Tensor:
        """Return the unscaled skew-symmetric filter ``A = (P - P^T) / 2``, shape (m, m, k, k)."""
        return 0.5 * (self.weight - transpose_filter(self.weight))

    @torch.no_grad()
    def update_power_iteration(self, iters: int = 1) -> None:
        """Run ``iters`` power-iteration steps on each reshape of ``A``, in place on the buffers."""
        if iters <= 0:
            return
        for name, R in filter_reshapes(self.skew_filter()).items():
            u, v = getattr(self, f'u_{name}'), getattr(self, f'v_{name}')
            for _ in range(iters):
                v.copy_(F.normalize(R.T @ u, dim=0, eps=1e-12))
                u.copy_(F.normalize(R @ v, dim=0, eps=1e-12))

    def spectral_bound(self) -> Tensor:
        """Return ``sigma = k * min_i u_i^T R_i v_i``, the bound on ``||conv_A||_2``.

        Each ``u_i^T R_i v_i`` is the power-iteration estimate of ``||R_i||``, which approaches
        it from below as the iteration converges. Differentiable with respect to ``P``, with the
        vectors held fixed. Reads the buffers and does not update them.
        """
        estimates = []
        for name, R in filter_reshapes(self.skew_filter()).items():
            # Clones keep this graph valid if a later forward updates the buffers in place.
            u = getattr(self, f'u_{name}').clone()
            v = getattr(self, f'v_{name}').clone()
            estimates.append(u @ (R @ v))
        return self.kernel_size * torch.stack(estimates).min()

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {C}")
        if self.stride == 2:
            if H % 2 or W % 2:
                raise ValueError(f"stride 2 needs an even height and width, got {H}x{W}")
            x = F.pixel_unshuffle(x, 2)                    # (N, 4*in, H/2, W/2)
        x = F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))  # (N, m, H', W')

        if self.training:
            self.update_power_iteration(1)
        # Small epsilon: a zero filter gives sigma = 0, and then A = 0 and exp(A) = I.
        A = self.skew_filter() * (0.7 / (self.spectral_bound() + 1e-12))
        terms = self.train_terms if self.training else self.eval_terms

        # exp(A) x as the truncated Taylor series sum_j A^j x / j!.
        z = x
        term = x
        for j in range(1, terms + 1):
            term = F.conv2d(term, A, padding=self.kernel_size // 2) / j
            z = z + term

        y = z[:, :self.out_channels]                       # (N, out, H', W')
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, bias={self.bias is not None}, '
                f'train_terms={self.train_terms}, eval_terms={self.eval_terms}')
