"""EigenGAN generator and discriminator (He et al., "EigenGAN: Layer-Wise Eigen-Learning for
GANs", ICCV 2021, arXiv 2104.12476).

The generator starts from noise ``ε`` mapped to a 4 × 4 feature map and doubles the resolution in
each of ``log2(size) − 2`` blocks. Every block owns a linear subspace with an orthonormal basis
``U``, and a code ``z`` of ``n_basis`` numbers per block moves the image along that block's basis
directions. This per-layer structure is what makes the codes interpretable. The bases ``U`` are the
pre-SVD parameters to which NOG and OLR (Song et al., arXiv 2207.02119, 2212.05599) apply.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCH_KEYS = ('size', 'n_basis', 'noise_dim', 'base_channels', 'max_channels')


def channels_at(resolution: int, size: int, base_channels: int, max_channels: int) -> int:
    """Return the channel count at a resolution: ``base · size / resolution``, capped."""
    return min(max_channels, base_channels * size // resolution)


def check_size(size: int) -> int:
    """Return the number of generator blocks, ``log2(size) − 2``, for a power-of-two size."""
    n_blocks = int(round(math.log2(size))) - 2 if size > 0 else 0
    if size < 8 or 2 ** (n_blocks + 2) != size:
        raise ValueError(f'image size must be a power of two of at least 8, got {size}')
    return n_blocks


class SubspaceLayer(nn.Module):
    """Linear subspace ``φ = (L ⊙ z) U + μ`` of one EigenGAN block.

    ``z`` is ``(N, n_basis)``, ``U`` is ``(n_basis, dim)`` with orthonormal rows at
    initialisation, ``L`` contains one importance weight per basis vector, initialised
    ``3·n_basis, …, 6, 3`` so the first directions start with the largest effect, and ``μ`` is
    the subspace origin ``(dim,)``. Output: ``(N, dim)``.
    """

    def __init__(self, dim: int, n_basis: int):
        super().__init__()
        self.U = nn.Parameter(torch.empty(n_basis, dim))
        nn.init.orthogonal_(self.U)
        self.L = nn.Parameter(3.0 * torch.arange(n_basis, 0, -1, dtype=torch.float32))
        self.mu = nn.Parameter(torch.zeros(dim))

    def forward(self, z: Tensor) -> Tensor:
        return (self.L * z) @ self.U + self.mu


class EigenBlock(nn.Module):
    """One generator block: inject the subspace point, then upsample by two.

    ``h`` is ``(N, C_in, H, W)`` and ``z`` is ``(N, n_basis)``. The subspace point ``φ`` is
    reshaped to ``(N, C_in, H, W)`` and added twice: through a 1 × 1 convolution before the
    upsampling convolution, and through its own transposed convolution after it.
    Output: ``(N, C_out, 2H, 2W)``.
    """

    def __init__(self, resolution: int, in_channels: int, out_channels: int, n_basis: int):
        super().__init__()
        self.subspace = SubspaceLayer(in_channels * resolution * resolution, n_basis)
        self.subspace_conv1 = nn.Conv2d(in_channels, in_channels, 1)
        self.subspace_conv2 = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2,
                                                 padding=1, output_padding=1)
        self.feature_conv1 = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2,
                                                padding=1, output_padding=1)
        self.feature_conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        N, C, H, W = h.shape
        phi = self.subspace(z).view(N, C, H, W)
        # (N, C_out, 2H, 2W)
        h = F.leaky_relu(self.feature_conv1(h + self.subspace_conv1(phi)), 0.2)
        return F.leaky_relu(self.feature_conv2(h + self.subspace_conv2(phi)), 0.2)


class Generator(nn.Module):
    """EigenGAN generator: ``x = G(z, ε)`` with images ``(N, 3, size, size)`` in ``[−1, 1]``.

    ``z`` is ``(N, n_blocks, n_basis)``, one subspace code per block, coarse blocks first, and
    ``ε`` is ``(N, noise_dim)``. Both are drawn from ``N(0, I)`` during training. Channels are
    ``min(max_channels, base_channels · size / resolution)`` at each resolution.
    """

    def __init__(self, size: int = 256, n_basis: int = 6, noise_dim: int = 512,
                 base_channels: int = 16, max_channels: int = 512):
        super().__init__()
        self.size, self.n_basis, self.noise_dim = size, n_basis, noise_dim
        self.base_channels, self.max_channels = base_channels, max_channels
        self.n_blocks = check_size(size)
        resolutions = [4 * 2 ** i for i in range(self.n_blocks + 1)]
        channels = [channels_at(r, size, base_channels, max_channels) for r in resolutions]
        self.fc = nn.Linear(noise_dim, channels[0] * 4 * 4)
        self.blocks = nn.ModuleList(
            EigenBlock(r, c_in, c_out, n_basis)
            for r, c_in, c_out in zip(resolutions, channels, channels[1:]))
        self.to_rgb = nn.Conv2d(channels[-1], 3, 7, padding=3)

    def arch(self) -> dict:
        """Return the constructor arguments as plain data (stored in checkpoints)."""
        return {key: getattr(self, key) for key in ARCH_KEYS}

    def subspace_bases(self) -> list[nn.Parameter]:
        """Return every block's basis ``U`` (the pre-SVD parameters), coarse blocks first."""
        return [block.subspace.U for block in self.blocks]

    def forward(self, z: Tensor, eps: Tensor) -> Tensor:
        N = eps.shape[0]
        h = F.leaky_relu(self.fc(eps), 0.2).view(N, -1, 4, 4)  # (N, C_4, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, z[:, i])
        return torch.tanh(self.to_rgb(h))  # (N, 3, size, size)


class Discriminator(nn.Module):
    """Convolutional discriminator: ``(N, 3, size, size)`` in ``[−1, 1]`` to logits ``(N,)``.

    A 3 × 3 convolution from RGB, then per resolution a 3 × 3 convolution and a stride-2 3 × 3
    convolution down to 4 × 4, then two linear layers. Channels mirror the generator's.
    """

    def __init__(self, size: int = 256, base_channels: int = 16, max_channels: int = 512):
        super().__init__()
        check_size(size)
        layers = [nn.Conv2d(3, channels_at(size, size, base_channels, max_channels), 3,
                            padding=1), nn.LeakyReLU(0.2)]
        resolution = size
        while resolution > 4:
            c_in = channels_at(resolution, size, base_channels, max_channels)
            c_out = channels_at(resolution // 2, size, base_channels, max_channels)
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            resolution //= 2
        self.features = nn.Sequential(*layers)
        c_4 = channels_at(4, size, base_channels, max_channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_4 * 4 * 4, c_4), nn.LeakyReLU(0.2),
                                  nn.Linear(c_4, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(1)


def d_loss(kind: str, real_pred: Tensor, gen_pred: Tensor) -> Tensor:
    """Discriminator loss on logits of real and generated images.

    hinge: ``E[max(0, 1 − D(x))] + E[max(0, 1 + D(G(z)))]``;
    non_saturating: ``E[softplus(−D(x))] + E[softplus(D(G(z)))]``;
    lsgan: ``E[(D(x) − 1)²] + E[D(G(z))²]``.

    NOTE: the published lsgan raised the residual to the fourth power; it is squared here, as in
    least-squares GANs (Mao et al., arXiv 1611.04076).
    """
    if kind == 'hinge':
        return F.relu(1 - real_pred).mean() + F.relu(1 + gen_pred).mean()
    if kind == 'non_saturating':
        return F.softplus(-real_pred).mean() + F.softplus(gen_pred).mean()
    if kind == 'lsgan':
        return (real_pred - 1).pow(2).mean() + gen_pred.pow(2).mean()
    raise ValueError(f'unknown adversarial loss {kind!r}')


def g_loss(kind: str, gen_pred: Tensor) -> Tensor:
    """Generator loss: hinge ``−E[D(G(z))]``, non_saturating ``E[softplus(−D(G(z)))]``,
    lsgan ``E[(D(G(z)) − 1)²]``."""
    if kind == 'hinge':
        return -gen_pred.mean()
    if kind == 'non_saturating':
        return F.softplus(-gen_pred).mean()
    if kind == 'lsgan':
        return (gen_pred - 1).pow(2).mean()
    raise ValueError(f'unknown adversarial loss {kind!r}')


def orthogonality_penalty(bases: list[Tensor]) -> Tensor:
    """Return the EigenGAN penalty ``Σ_U mean((U Uᵀ − I)²)`` over the subspace bases."""
    total = bases[0].new_zeros(())
    for U in bases:
        eye = torch.eye(U.shape[0], dtype=U.dtype, device=U.device)
        total = total + (U @ U.T - eye).pow(2).mean()
    return total
