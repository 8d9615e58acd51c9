"""Generator and discriminator of the vanilla GAN (128 and 64 pixels).

The generator's first layer, a 4x4 transposed convolution from the latent code, is the layer
on which nearest orthogonal gradient (NOG) and optimal learning rate (OLR) act (Song et al.,
"Orthogonal SVD Covariance Conditioning and Latent Disentanglement", TPAMI 2023, arXiv
2212.05599). Its weight has shape (nz, 1024, 4, 4), so reshaped to one row per latent
dimension it is the (nz, 16384) matrix whose rows NOG makes orthonormal.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

# Output channels of the upsampling blocks of the 128-pixel generator; the 64-pixel one drops
# the first block. The discriminator mirrors the list.
BLOCK_CHANNELS = (1024, 512, 256, 128, 64)
FIRST_CHANNELS = 1024
IMAGE_SIZES = {'gan': 64, 'gan128': 128}


def scaled(channels: int, width_mult: float) -> int:
    """Channel count times ``width_mult``, at least 4 (``width_mult`` 1 gives the paper's)."""
    return max(4, int(round(channels * width_mult)))


class Generator(nn.Module):
    """DCGAN-style generator: a latent code (N, nz) to images (N, nc_out, size, size) in [-1, 1].

    Layers: ``first`` = ConvTranspose 4x4 from nz to 1024 channels on a 1x1 input (4x4 output,
    no bias, norm or activation); ``blocks`` = ConvTranspose 4x4 stride 2, instance norm, LeakyReLU
    0.2, with 1024, 512, 256, 128, 64 channels (five blocks at 128 pixels, the last four at
    64); ``to_rgb`` = Conv 3x3 to ``nc_out`` channels and tanh.

    ``width_mult`` scales every channel count (1.0 is the published network; the tests use
    tiny values). ``features(z, n)`` returns the first ``n`` layer outputs, the ones that the
    OroJaR and Hessian Penalty regularisers act on.
    """

    def __init__(self, nz: int = 30, nc_out: int = 3, size: int = 128, width_mult: float = 1.0):
        super().__init__()
        if size not in (64, 128):
            raise ValueError(f"image size must be 64 or 128, got {size}")
        self.nz, self.nc_out, self.size = nz, nc_out, size
        n_blocks = 5 if size == 128 else 4
        widths = [scaled(c, width_mult) for c in BLOCK_CHANNELS[-n_blocks:]]
        in_channels = scaled(FIRST_CHANNELS, width_mult)
        # No bias, so the first layer is linear in z, as SeFa assumes. In a short CPU run with
        # a bias, the samples after 100 steps barely depended on z.
        self.first = nn.ConvTranspose2d(nz, in_channels, kernel_size=4, stride=1, padding=0,
                                        bias=False)
        blocks = []
        for out_channels in widths:
            blocks.append(nn.Sequential(
                # The bias is left out because instance norm removes it anyway.
                nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1,
                                   bias=False),
                nn.InstanceNorm2d(out_channels),
                nn.LeakyReLU(0.2),
            ))
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.to_rgb = nn.Sequential(nn.Conv2d(in_channels, nc_out, 3, padding=1), nn.Tanh())

    def features(self, z: Tensor, n_layers: int = 5) -> list[Tensor]:
        """Return the outputs of the first ``n_layers`` layers (``first``, then the blocks)."""
        h = self.first(z[:, :, None, None])  # (N, 1024, 4, 4)
        outputs = [h]
        for block in self.blocks[:max(0, n_layers - 1)]:
            h = block(h)  # spatial size doubles, channels follow BLOCK_CHANNELS
            outputs.append(h)
        return outputs[:n_layers]

    def forward(self, z: Tensor) -> Tensor:
        h = self.first(z[:, :, None, None])
        for block in self.blocks:
            h = block(h)
        return self.to_rgb(h)  # (N, nc_out, size, size)


class Discriminator(nn.Module):
    """Five 4x4 stride-2 convolutions (64, 128, 256, 512, 1024 channels, LeakyReLU 0.2) and
    two linear layers, from images (N, nc, size, size) to one logit per image (N,).

    No normalisation layer is used, because the gradient penalty is computed per sample.
    """

    def __init__(self, nc: int = 3, size: int = 128, width_mult: float = 1.0):
        super().__init__()
        layers, in_channels = [], nc
        for channels in reversed(BLOCK_CHANNELS):
            out_channels = scaled(channels, width_mult)
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1),
                       nn.LeakyReLU(0.2)]
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)
        side = size // 32  # 4 at 128 pixels, 2 at 64
        hidden = scaled(BLOCK_CHANNELS[0], width_mult)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, hidden),
                                  nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.convs(x)).squeeze(1)


def build_networks(model: str, nz: int, nc_out: int, width_mult: float = 1.0
                   ) -> tuple[Generator, Discriminator]:
    """Build ``(G, D)`` for ``--model gan`` (64 pixels) or ``gan128`` (128 pixels)."""
    size = IMAGE_SIZES[model]
    return (Generator(nz, nc_out, size, width_mult),
            Discriminator(nc_out, size, width_mult))


def pre_svd_weight(G: Generator) -> nn.Parameter:
    """Return the weight on which NOG and OLR act: the first layer's, shape (nz, C, 4, 4)."""
    return G.first.weight


def sefa_directions(G: Generator) -> tuple[Tensor, Tensor]:
    """Return the SeFa latent directions and their singular values.

    SeFa (Shen and Zhou, "Closed-Form Factorization of Latent Semantics in GANs", CVPR 2021,
    arXiv 2007.06600): with the first layer's weight reshaped to ``W`` of shape (nz, C*4*4),
    the directions are the eigenvectors of ``W W^T``, i.e. the left singular vectors of ``W``.
    Returns ``U`` (nz, nz), one direction per column, ordered by decreasing singular value,
    and the singular values ``S`` (nz,).
    """
    W = G.first.weight.detach().double().reshape(G.nz, -1)  # (nz, C*4*4)
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    return U.float(), S.float()


def sefa_rotated(G: Generator) -> tuple[Generator, Tensor]:
    """Return a copy of ``G`` whose latent axes are the SeFa directions, and the rotation ``U``.

    The first layer is linear in z (it has no bias): its output is ``sum_i z_i W_i``.
    Replacing ``W`` by ``U^T W`` gives a generator ``G'`` with ``G'(c) = G(U c)``, so moving
    along axis ``j`` of ``c`` moves along direction ``U[:, j]`` of the original latent space.
    """
    U, _ = sefa_directions(G)
    rotated = copy.deepcopy(G)
    with torch.no_grad():
        W = G.first.weight.reshape(G.nz, -1)
        rotated.first.weight.copy_((U.to(W).T @ W).reshape_as(G.first.weight))
    return rotated, U
