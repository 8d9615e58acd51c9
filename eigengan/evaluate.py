"""Evaluation of a trained EigenGAN: loading, FID, PPL, traversals and VP pairs.

``load_generator`` and ``vp_generate_fn`` are the entry points that ``gen_pairs.py`` and
``eigengan/test.py`` use; ``regenerate_pairs`` rebuilds any pair from ``codes.npz``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from eigengan.model import ARCH_KEYS, Generator
from models.gan import save_image_grid
from models.metrics import frechet_distance, inception_statistics
from models.runs import UserError, load_checkpoint

PPL_EPSILON = 1e-4
PPL_MAX_SIDE = 256


def is_eigengan_checkpoint(state) -> bool:
    """Return True for a loaded checkpoint written by the EigenGAN trainer."""
    return isinstance(state, dict) and {'arch', 'G', 'G_ema'} <= state.keys()


def load_generator(checkpoint_path, device, use_ema: bool = True) -> Generator:
    """Build the generator described by an EigenGAN checkpoint and load its weights.

    The architecture (size, n_basis, noise_dim, channels) comes from the checkpoint. With
    ``use_ema`` the EMA weights ``G_ema`` are loaded, else the raw ``G``. The model is returned
    in eval mode without gradients. A file that is not an EigenGAN checkpoint, or whose
    weights do not fit its architecture, raises ``UserError`` naming the file.
    """
    state = load_checkpoint(checkpoint_path)
    if not is_eigengan_checkpoint(state):
        raise UserError(f'{checkpoint_path} is not an EigenGAN checkpoint (expected the keys '
                        f'arch, G and G_ema, as written by eigengan/train_*.py)')
    arch = state['arch']
    if not isinstance(arch, dict) or set(arch) != set(ARCH_KEYS):
        raise UserError(f'{checkpoint_path}: invalid architecture record {arch!r}')
    try:
        G = Generator(**arch)
    except ValueError as err:
        raise UserError(f'{checkpoint_path}: invalid architecture {arch}: {err}') from None
    weights = state['G']
    if use_ema:
        # AveragedModel keeps the averaged network under 'module.' and a sample counter.
        weights = {k[len('module.'):]: v for k, v in state['G_ema'].items()
                   if k.startswith('module.')}
    try:
        G.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:2]
        raise UserError(f'{checkpoint_path}: the weights do not fit the architecture {arch} '
                        f'recorded in it ({" ".join(first)})') from None
    return G.eval().requires_grad_(False).to(device)


def generate_images(G: Generator, n: int, batch: int, device,
                    generator: torch.Generator) -> Iterator[Tensor]:
    """Yield ``n`` images from ``z, ε ~ N(0, I)`` in batches (all draws from ``generator``)."""
    done = 0
    while done < n:
        b = min(batch, n - done)
        z = torch.randn(b, G.n_blocks, G.n_basis, generator=generator)
        eps = torch.randn(b, G.noise_dim, generator=generator)
        with torch.no_grad():
            yield G(z.to(device), eps.to(device))
        done += b


def real_statistics(dataset, model, n: int, batch: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Return Inception statistics of the first ``min(n, len(dataset))`` images of a dataset."""
    subset = Subset(dataset, range(min(n, len(dataset))))
    loader = DataLoader(subset, batch_size=batch, num_workers=0)
    return inception_statistics(loader, model, device)


def generated_fid(G, real_stats, model, n: int, batch: int, device, generator) -> float:
    """Return the FID between ``n`` generated images and precomputed real statistics."""
    mu, sigma = inception_statistics(generate_images(G, n, batch, device, generator), model,
                                     device)
    return frechet_distance(mu, sigma, *real_stats)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of the directions of ``a`` and ``b`` (last dimension), as unit
    vectors: ``sin((1 − t)Ω)/sin Ω · â + sin(tΩ)/sin Ω · b̂`` with ``cos Ω = â · b̂``.

    NOTE: like the PPL of StyleGAN (Karras et al., arXiv 1812.04948) the result has unit
    norm, so the endpoints are normalised codes rather than the raw ``U[0, 1)`` draws.
    """
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    cos = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.acos(cos)
    t = t.view(-1, *([1] * (a.dim() - 1)))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def path_lengths(G: Generator, lpips_model, n: int, batch: int, device,
                 generator: torch.Generator, epsilon: float = PPL_EPSILON) -> np.ndarray:
    """Return ``n`` perceptual path lengths ``LPIPS(G(z_t), G(z_{t+ε})) / ε²``.

    Per layer ``z1, z2 ~ U[0, 1)^n_basis``, and one ``t ~ U[0, 1)`` per sample. Each layer's
    code is spherically interpolated (``slerp``) at ``t`` and ``t + ε``, and both images share
    the noise ``ε ~ N(0, I)``. Images larger than 256 pixels are area-downsampled to 256
    before LPIPS-VGG, which takes them in ``[−1, 1]``.
    """
    values = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        z1 = torch.rand(b, G.n_blocks, G.n_basis, generator=generator)
        z2 = torch.rand(b, G.n_blocks, G.n_basis, generator=generator)
        t = torch.rand(b, generator=generator)
        eps = torch.randn(b, G.noise_dim, generator=generator).to(device)
        za, zb = slerp(z1, z2, t), slerp(z1, z2, t + epsilon)
        with torch.no_grad():
            images = G(torch.cat([za, zb]).to(device), torch.cat([eps, eps]))
            if images.shape[-1] > PPL_MAX_SIDE:
                images = F.interpolate(images, size=PPL_MAX_SIDE, mode='area')
            dist = lpips_model(images[:b], images[b:]).flatten()
        values.append((dist / epsilon ** 2).double().cpu())
    return torch.cat(values).numpy()


def trimmed_mean(values: np.ndarray, low: float = 1.0, high: float = 99.0) -> float:
    """Return the mean of the values between the ``low`` and ``high`` percentiles (inclusive)."""
    lo, hi = np.percentile(values, [low, high])
    return float(values[(values >= lo) & (values <= hi)].mean())


def write_traversals(G: Generator, out_dir: Path, n_rows: int, n_steps: int, extent: float,
                     n_sample: int, device, generator: torch.Generator) -> list[Path]:
    """Write ``samples.png`` and one traversal grid per layer and basis dimension.

    ``traverse/layer{l}_dim{d}.png`` has ``n_rows`` rows (samples with ``z, ε ~ N(0, I)``) and
    ``n_steps`` columns, where code ``d`` of layer ``l`` goes from ``−extent`` to ``+extent``
    and every other code stays fixed. Layer 0 is the coarsest (4 × 4) block.
    """
    paths = [out_dir / 'samples.png']
    images = torch.cat(list(generate_images(G, n_sample, 64, device, generator)))
    save_image_grid(images, paths[0], nrow=max(1, int(n_sample ** 0.5)))
    z = torch.randn(n_rows, G.n_blocks, G.n_basis, generator=generator)
    eps = torch.randn(n_rows, G.noise_dim, generator=generator)
    values = torch.linspace(-extent, extent, n_steps)
    for layer in range(G.n_blocks):
        for dim in range(G.n_basis):
            codes = z.repeat_interleave(n_steps, dim=0)  # (n_rows * n_steps, n_blocks, n_basis)
            codes[:, layer, dim] = values.repeat(n_rows)
            with torch.no_grad():
                grid = G(codes.to(device), eps.repeat_interleave(n_steps, dim=0).to(device))
            path = out_dir / 'traverse' / f'layer{layer}_dim{dim}.png'
            save_image_grid(grid, path, nrow=n_steps)
            paths.append(path)
    return paths


def vp_generate_fn(G: Generator, device, extent: float = 4.0,
                   truncation: float = 0.7) -> Callable:
    """Return ``generate(batch, generator)`` for ``models.vp_pairs.write_vp_pairs``.

    Each pair shares its noise ``ε ~ 0.7 · N(0, I)`` (truncation 0.7) and subspace codes
    ``z1 ~ U[−extent, extent]`` over all layers, flattened to ``(n_blocks · n_basis,)``.
    ``z2`` equals ``z1`` except in one uniformly chosen dimension, which is drawn afresh from
    the same range. Labels are ``z1 − z2``; codes are ``z1``, ``z2`` and ``noise``.
    """
    d = G.n_blocks * G.n_basis

    def generate(batch: int, generator: torch.Generator):
        z1 = (torch.rand(batch, d, generator=generator) * 2 - 1) * extent
        noise = torch.randn(batch, G.noise_dim, generator=generator) * truncation
        changed = torch.randint(0, d, (batch,), generator=generator)
        z2 = z1.clone()
        z2[torch.arange(batch), changed] = (torch.rand(batch, generator=generator) * 2 - 1) * extent
        img1, img2 = regenerate_pairs(G, z1, z2, noise, device)
        return img1, img2, {'z1': z1, 'z2': z2, 'noise': noise}, z1 - z2

    return generate


def regenerate_pairs(G: Generator, z1: Tensor, z2: Tensor, noise: Tensor,
                     device) -> tuple[Tensor, Tensor]:
    """Return the images of VP pairs from their codes (as stored in ``codes.npz``)."""
    shape = (-1, G.n_blocks, G.n_basis)
    z1, z2 = torch.as_tensor(z1).float(), torch.as_tensor(z2).float()
    noise = torch.as_tensor(noise).float().to(device)
    with torch.no_grad():
        return G(z1.view(shape).to(device), noise), G(z2.view(shape).to(device), noise)
