"""Pieces that the EigenGAN and vanilla GAN trainers share.

Generator EMA, the R1 and WGAN-GP gradient penalties, DiffAugment, a resumable data order, an
endless data loader and atomic image-grid saving.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Sampler
from torchvision.utils import save_image


def make_ema(G: nn.Module, decay: float) -> AveragedModel:
    """Return an exponential moving average of the generator's weights.

    After each ``G_ema.update_parameters(G)``, every parameter and buffer becomes
    ``θ_ema ← decay · θ_ema + (1 − decay) · θ_G``. The average starts from a copy of ``G``
    and counts that copy as one sample, so the very first update already blends with weight
    ``decay`` (``AveragedModel`` would otherwise copy ``G`` on its first update).
    EigenGAN (He et al., arXiv 2104.12476) uses ``decay = 0.5 ** (batch / 10000)``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f'EMA decay must lie in [0, 1], got {decay}')
    G_ema = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    G_ema.n_averaged.fill_(1)
    G_ema.requires_grad_(False)
    return G_ema


def r1_penalty(real_pred: Tensor, real_img: Tensor) -> Tensor:
    """Return the R1 penalty ``E[‖∇_x D(x)‖²]`` on real images (Mescheder et al., 1801.04406).

    ``real_img`` must have had ``requires_grad_(True)`` before ``real_pred = D(aug(real_img))``.
    The caller weights it by ``γ / 2`` (and by the interval of lazy regularisation). The graph
    is kept so the penalty can be backpropagated into ``D``.
    """
    (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def gradient_penalty(D: Callable[[Tensor], Tensor], real_img: Tensor, gen_img: Tensor) -> Tensor:
    """Return the WGAN-GP penalty ``E[(‖∇_x̂ D(x̂)‖₂ − 1)²]`` (Gulrajani et al., 1704.00028).

    ``x̂ = α x_real + (1 − α) x_gen`` with ``α ~ U[0, 1)`` per sample. The caller multiplies by
    the penalty weight (10 in the vanilla GAN).
    """
    alpha = torch.rand(real_img.shape[0], 1, 1, 1, device=real_img.device)
    x_hat = (alpha * real_img.detach() + (1 - alpha) * gen_img.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def _rand(x: Tensor) -> Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def _color(x: Tensor) -> Tensor:
    x = x + (_rand(x) - 0.5)  # brightness shift in [-0.5, 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x) * 2) + mean  # saturation scale in [0, 2)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x) + 0.5) + mean  # contrast scale in [0.5, 1.5)


def _translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    N, C, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (N, 1, 1), device=x.device)
    tx = torch.randint(-sw, sw + 1, (N, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device),
                            indexing='ij')
    padded = F.pad(x, (sw, sw, sh, sh))  # zeros enter where the image moves away
    n = torch.arange(N, device=x.device).view(N, 1, 1)
    out = padded[n, :, gy + sh + ty, gx + sw + tx]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def _cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    N, C, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    # Top-left corners anywhere from half a square outside the image to half inside its edge.
    y0 = torch.randint(0, H + 1, (N, 1, 1), device=x.device) - ch // 2
    x0 = torch.randint(0, W + 1, (N, 1, 1), device=x.device) - cw // 2
    gy = torch.arange(H, device=x.device).view(1, H, 1)
    gx = torch.arange(W, device=x.device).view(1, 1, W)
    inside = (gy >= y0) & (gy < y0 + ch) & (gx >= x0) & (gx < x0 + cw)  # (N, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTATIONS = {'color': _color, 'translation': _translation, 'cutout': _cutout}


def diff_augment(x: Tensor, policy: str = 'color,translation,cutout') -> Tensor:
    """Apply differentiable augmentation (DiffAugment, Zhao et al., arXiv 2006.10738).

    ``x`` is ``(N, C, H, W)`` in ``[-1, 1]``; the output has the same shape. Each sample gets its
    own random draw of:

    - ``color``: brightness ``x + b`` with ``b ~ U[−0.5, 0.5)``, saturation
      ``(x − x̄_c) · s + x̄_c`` with ``s ~ U[0, 2)`` about the channel mean, contrast
      ``(x − x̄) · c + x̄`` with ``c ~ U[0.5, 1.5)`` about the image mean;
    - ``translation``: an integer shift of up to 1/8 of the side in each direction, filling
      with zeros;
    - ``cutout``: a zeroed square of half the side, placed uniformly.

    Every operation is a composition of differentiable tensor ops, so gradients reach the
    generator through augmented fakes. The same policy must be applied to real and generated
    images.
    """
    for name in filter(None, (p.strip() for p in policy.split(','))):
        if name not in AUGMENTATIONS:
            raise ValueError(f'unknown DiffAugment policy {name!r}; choose from '
                             f'{", ".join(AUGMENTATIONS)}')
        x = AUGMENTATIONS[name](x)
    return x.contiguous()


class EpochSampler(Sampler[int]):
    """Random data order that a checkpoint can restore exactly, even mid-epoch.

    Epoch ``e`` visits the indices in ``torch.randperm(n)`` drawn from a dedicated generator
    seeded with ``seed`` and ``e``, so the order never touches the global RNG. ``start`` skips
    the first ``start`` indices of the next pass only (set it when resuming mid-epoch).
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.n


def infinite_loader(loader, start_epoch: int = 0) -> Iterator:
    """Yield batches forever, re-iterating ``loader`` and calling ``sampler.set_epoch(epoch)``.

    The sampler's ``set_epoch`` (``EpochSampler``, ``DistributedSampler``) is called before
    every pass, with ``start_epoch`` for the first one.
    """
    epoch = start_epoch
    while True:
        sampler = getattr(loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def save_image_grid(images: Tensor, path, nrow: int) -> None:
    """Save images in ``[-1, 1]`` as one grid with ``nrow`` images per row, written atomically.

    The format follows the suffix of ``path`` (PNG, JPEG, …). The file is written to a
    temporary name in the same folder and renamed, so a reader never sees half an image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp')
    image_format = path.suffix.lstrip('.').lower().replace('jpg', 'jpeg') or 'png'
    save_image(images.detach().float().cpu(), tmp, nrow=nrow, normalize=True,
               value_range=(-1, 1), padding=2, format=image_format)
    os.replace(tmp, path)
