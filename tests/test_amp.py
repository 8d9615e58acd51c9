"""Tests of models/amp.py: autocast modes, the gradient scaler, NOG and OLR after unscaling."""
import copy
import logging

import pytest
import torch
from torch import nn

from models import amp, orthogonality, zca
from models.runs import UserError

CPU = torch.device('cpu')
LR = 0.1
SCALE = 2.0**20


def _stem_model() -> nn.Sequential:
    """A wide pre-SVD linear layer (4 x 10) followed by a small head, float32."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 4, bias=False), nn.Tanh(), nn.Linear(4, 2))


def _optimizer_and_update(model: nn.Module, nog: bool = True, olr: bool = True):
    pre_svd = [model[0].weight]
    groups = orthogonality.split_param_groups(model.parameters(), pre_svd)
    optimizer = torch.optim.SGD(groups, lr=LR)
    return optimizer, orthogonality.OrthogonalUpdate(optimizer, pre_svd, nog=nog, olr=olr)


def _loss(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 10, generator=generator)
    target = torch.randn(16, 2, generator=generator)
    return nn.functional.mse_loss(model(x), target)


class _RecordingUpdate:
    """Wrap an OrthogonalUpdate and keep a copy of the pre-SVD gradient that it receives."""

    def __init__(self, update):
        self.update, self.seen = update, []

    def apply(self, base_lr: float) -> bool:
        self.seen.append(self.update.pre_svd[0].grad.detach().clone())
        return self.update.apply(base_lr)


def test_autocast_off_is_noop():
    with amp.autocast(CPU, 'off'):
        y = nn.Linear(3, 3)(torch.randn(2, 3))
    assert y.dtype == torch.float32


def test_autocast_bf16_on_cpu():
    with amp.autocast(CPU, 'bf16'):
        y = nn.Linear(3, 3)(torch.randn(2, 3))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize('mode, enabled', [('off', False), ('bf16', False), ('fp16', True)])
def test_grad_scaler_only_for_fp16(mode, enabled):
    assert amp.make_grad_scaler(mode, CPU).is_enabled() is enabled


def test_check_amp_rejects_unknown_mode():
    with pytest.raises(UserError, match="invalid --amp 'fp8'"):
        amp.check_amp('fp8', CPU)


@pytest.mark.parametrize('nog', [True, False])
def test_nog_olr_see_unscaled_gradient(nog):
    # The true gradient and the step without any scaler.
    model = _stem_model()
    reference = copy.deepcopy(model)
    optimizer, update = _optimizer_and_update(reference, nog=nog)
    recorded_plain = _RecordingUpdate(update)
    assert amp.step_with_orthogonal_update(_loss(reference), optimizer,
                                           amp.make_grad_scaler('off', CPU), recorded_plain, LR)

    # The same step under a GradScaler with a large loss scale.
    optimizer, update = _optimizer_and_update(model, nog=nog)
    recorded = _RecordingUpdate(update)
    scaler = torch.amp.GradScaler('cpu', init_scale=SCALE)
    assert amp.step_with_orthogonal_update(_loss(model), optimizer, scaler, recorded, LR)

    true_grad, seen = recorded_plain.seen[0], recorded.seen[0]
    ratio = (seen.norm() / true_grad.norm()).item()
    assert abs(ratio - 1) < 1e-5, f"NOG saw the gradient times {ratio:.6g}, expected 1"
    eta_scaled, eta_plain = recorded.update.last['eta'], recorded_plain.update.last['eta']
    assert eta_scaled == pytest.approx(eta_plain, rel=1e-5), (eta_scaled, eta_plain)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        diff = (p - q).abs().max().item()
        assert diff < 1e-6, f"{name}: scaled vs unscaled step differ by {diff:.3g}"


def test_overflow_skips_step_and_backs_off():
    model = _stem_model()
    before = copy.deepcopy(model.state_dict())
    optimizer, update = _optimizer_and_update(model)
    # A scale near float32's maximum times a loss of ~1e6 overflows to Inf.
    scaler = torch.amp.GradScaler('cpu', init_scale=3e38)
    loss = _loss(model) * 1e6
    stepped = amp.step_with_orthogonal_update(loss, optimizer, scaler, update, LR)
    assert stepped is False
    assert update.skipped == 1, update.skipped
    assert scaler.get_scale() < 3e38, scaler.get_scale()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed in a skipped step"


def test_step_needs_base_lr_with_update():
    model = _stem_model()
    optimizer, update = _optimizer_and_update(model)
    amp.scaled_backward(_loss(model), amp.make_grad_scaler('off', CPU))
    with pytest.raises(ValueError, match='base_lr'):
        amp.step_optimizer(optimizer, amp.make_grad_scaler('off', CPU), update)


def test_bf16_keeps_meta_layer_float64(monkeypatch):
    seen_dtypes = []
    original = zca._inverse_sqrt_and_eigvals

    def recording(Sigma, backend):
        S, lam = original(Sigma, backend)
        seen_dtypes.append((Sigma.dtype, S.dtype))
        return S, lam

    monkeypatch.setattr(zca, '_inverse_sqrt_and_eigvals', recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), zca.ZCANormBatch(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    pre_svd = [model[0].weight]
    optimizer = torch.optim.SGD(orthogonality.split_param_groups(model.parameters(), pre_svd),
                                lr=LR)
    update = orthogonality.OrthogonalUpdate(optimizer, pre_svd, nog=True, olr=True)
    scaler = amp.make_grad_scaler('bf16', CPU)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast(CPU, 'bf16'):
            features = model[0](x)
            logits = model[1:](features)
            loss = nn.functional.cross_entropy(logits.float(), y)
        assert features.dtype == torch.bfloat16, features.dtype
        assert torch.isfinite(loss), loss.item()
        assert amp.step_with_orthogonal_update(loss, optimizer, scaler, update, LR)
    assert seen_dtypes == [(torch.float64, torch.float64)] * 2, seen_dtypes
    assert model[0].weight.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model[1].last_stats['whitening_residual'] < 1e-6, model[1].last_stats


@pytest.mark.parametrize('mode', ['off', 'bf16', 'fp16'])
def test_check_amp_warns_on_cpu(mode, caplog):
    with caplog.at_level(logging.WARNING, logger='models.amp'):
        amp.check_amp(mode, torch.device('cpu'))
    warned = [record.getMessage() for record in caplog.records]
    if mode == 'off':
        assert warned == []
    else:
        assert len(warned) == 1, warned
        assert f'--amp {mode} on the CPU' in warned[0], warned
