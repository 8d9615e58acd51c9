"""Adversarial losses of the vanilla GAN: ``vanilla``, ``lsgan`` and ``wgangp``.

Each mode maps discriminator logits (N,) to the two players' losses:

    vanilla  loss_D = BCE(D(x), 1) + BCE(D(G(z)), 0),   loss_G = BCE(D(G(z)), 1)
             (binary cross-entropy on logits, the non-saturating generator loss)
    lsgan    loss_D = mean((D(x) - 1)^2) + mean(D(G(z))^2), loss_G = mean((D(G(z)) - 1)^2)
    wgangp   loss_D = mean(D(G(z))) - mean(D(x)),           loss_G = -mean(D(G(z)))

In every mode the trainer adds the WGAN-GP penalty ``(||grad D(x_hat)|| - 1)^2`` weighted by
``--gp_weight`` (10) to ``loss_D``.

NOTE: the published least-squares loss raised the residual to the fourth power; here it is
squared, as in Mao et al., "Least Squares Generative Adversarial Networks" (ICCV 2017).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

GAN_MODES = ('vanilla', 'lsgan', 'wgangp')


def _target_loss(logits: Tensor, target: float, mode: str) -> Tensor:
    if mode == 'vanilla':
        return F.binary_cross_entropy_with_logits(logits, logits.new_full(logits.shape, target))
    if mode == 'lsgan':
        return (logits - target).pow(2).mean()
    raise ValueError(f"unknown GAN mode {mode!r}; expected one of {GAN_MODES}")


def discriminator_loss(real_pred: Tensor, fake_pred: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Return ``(loss_D_real, loss_D_fake)``; the discriminator minimises their sum."""
    if mode == 'wgangp':
        return -real_pred.mean(), fake_pred.mean()
    return _target_loss(real_pred, 1.0, mode), _target_loss(fake_pred, 0.0, mode)


def generator_loss(fake_pred: Tensor, mode: str) -> Tensor:
    """Return the generator's adversarial loss on the logits of its images."""
    if mode == 'wgangp':
        return -fake_pred.mean()
    return _target_loss(fake_pred, 1.0, mode)
