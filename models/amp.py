"""Mixed precision (``--amp {off,bf16,fp16}``) with the meta-layer, NOG and OLR kept wide.

Under ``autocast`` the convolutions and linear layers run in bfloat16 or float16, but the parts
of the method of Song, Sebe and Wang (arXiv 2207.02119, 2212.05599) that are sensitive to
round-off stay wide:

- ZCANormBatch accumulates sum(x) and sum(x x^T) in float32 with autocast disabled, and forms
  the covariance, Sigma^{-1/2} and its backward in float64;
- the gradients reach NOG and OLR in the parameters' dtype (float32), and NOG's polar factor is
  computed from a float64 Gram matrix.

With fp16 a ``GradScaler`` multiplies the loss by a scale ``s`` so that small gradients do not
underflow, and the gradients come out as ``s * L``. NOG maps ``s * L`` to the same ``U V^T`` as
``L``, so applying it to scaled gradients and unscaling afterwards would divide the update by
``s``; OLR's ``eta* = a b / (a c + 2 b^2)`` with ``b = s l.w`` and ``c = s^2 l.l`` is ``eta*/s``.
``step_optimizer`` therefore unscales (``scaler.unscale_``) before NOG and OLR.
"""
from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

import torch
from torch import Tensor

from models.runs import UserError

log = logging.getLogger(__name__)

AMP_MODES = ('off', 'bf16', 'fp16')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def add_amp_argument(group, kept_wide: str = 'NOG and OLR') -> None:
    """Add ``--amp {off,bf16,fp16}`` to an argparse parser or argument group.

    ``kept_wide`` names the parts of the model that stay in float32 or wider, for the help.
    """
    group.add_argument('--amp', choices=AMP_MODES, default='off',
                       help=f"mixed precision: bf16 or fp16 autocast (fp16 with a gradient "
                            f"scaler), meant for GPUs; {kept_wide} stay in float32 or wider")


def check_amp(mode: str, device: torch.device, flag_name: str = '--amp') -> None:
    """Raise UserError when ``mode`` is unknown or the device cannot run it."""
    if mode not in AMP_MODES:
        raise UserError(f"invalid {flag_name} {mode!r}: use one of {', '.join(AMP_MODES)}")
    if mode == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UserError(f"{flag_name} bf16 was requested but {torch.cuda.get_device_name(device)} "
                        f"does not support bfloat16: use {flag_name} fp16 or off")
    if mode != 'off' and device.type == 'cpu':
        # Measured on a 2-core AMD EPYC VM (benchmarks/README.md): bf16 steps 7-23 times
        # slower than float32.
        log.warning("%s %s on the CPU runs, but usually several times slower than float32 "
                    "(CPUs without half-precision matrix units); it is meant for GPUs%s",
                    flag_name, mode, ", and on the CPU it serves to test the gradient scaler"
                    if mode == 'fp16' else '')


def autocast(device: torch.device, mode: str) -> ContextManager:
    """Return the autocast context of ``mode`` on ``device`` (a no-op context for 'off')."""
    if mode == 'off':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[mode])


def make_grad_scaler(mode: str, device: torch.device, **options) -> torch.amp.GradScaler:
    """Return a ``torch.amp.GradScaler``, enabled only for fp16 (bf16 needs no loss scaling).

    A disabled scaler passes everything through, so the training step reads the same for
    every mode. Use one scaler per optimizer when the optimizers step in separate phases (the
    GAN discriminator and generator), so that each ``update`` follows its own step.
    """
    return torch.amp.GradScaler(device.type, enabled=(mode == 'fp16'), **options)


def scaled_backward(loss: Tensor, scaler: torch.amp.GradScaler, **backward_options) -> None:
    """Run ``backward`` on ``scaler.scale(loss)`` (the loss itself when the scaler is off)."""
    scaler.scale(loss).backward(**backward_options)


def step_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   orthogonal_update=None, base_lr: float | None = None) -> bool:
    """Unscale the gradients, apply NOG and OLR, then step the optimizer and the scaler.

    Order, after the backward pass (and after any gradient all-reduce):

    1. ``scaler.unscale_(optimizer)``: the gradients become the true ``L``;
    2. ``orthogonal_update.apply(base_lr)``, if given: NOG and OLR on ``L``. When it returns
       False (a pre-SVD gradient that is zero or contains NaN or Inf, as after an fp16
       overflow) the optimizer step is skipped;
    3. ``scaler.step(optimizer)``, which also skips the step when any unscaled gradient is
       not finite;
    4. ``scaler.update()``, always, so an overflow lowers the scale even when step 2 skipped.

    Returns True when the optimizer stepped. With fp16 the scaler's own skip is read from its
    scale, which backs off after an overflow (``get_scale`` costs one device sync).
    """
    if orthogonal_update is not None and base_lr is None:
        raise ValueError("step_optimizer needs base_lr when an OrthogonalUpdate is given")
    scaler.unscale_(optimizer)
    go_ahead = True
    if orthogonal_update is not None:
        go_ahead = orthogonal_update.apply(base_lr)

    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    if go_ahead:
        scaler.step(optimizer)
    scaler.update()
    if go_ahead and scale_before is not None:
        go_ahead = scaler.get_scale() >= scale_before
    return go_ahead


def step_with_orthogonal_update(loss: Tensor, optimizer: torch.optim.Optimizer,
                                scaler: torch.amp.GradScaler, orthogonal_update=None,
                                base_lr: float | None = None) -> bool:
    """Backward pass and optimizer step for one loss: ``scaled_backward`` + ``step_optimizer``.

    The caller zeroes the gradients before the forward pass. With DDP the gradients are
    averaged during the backward pass, so NOG and OLR see the averaged ``L`` on every rank.
    Returns True when the optimizer stepped.
    """
    scaled_backward(loss, scaler)
    return step_optimizer(optimizer, scaler, orthogonal_update, base_lr)
