"""Tests of the skew orthogonal convolution (models/soc.py)."""
import pytest
import torch
import torch.nn.functional as F

from models.soc import SkewOrthogonalConv2d, transpose_filter


def make_layer(in_channels, out_channels, stride=1, bias=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    return SkewOrthogonalConv2d(in_channels, out_channels, stride=stride, bias=bias, **kwargs)


def norm_ratios(layer, in_channels, seed=1):
    x = torch.randn(4, in_channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = layer(x)
    return y.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)


@pytest.mark.parametrize('in_channels, out_channels, stride',
                         [(3, 8, 1), (8, 8, 1), (3, 64, 1), (2, 8, 2), (3, 12, 2), (2, 16, 2)])
def test_soc_eval_preserves_norm(in_channels, out_channels, stride):
    layer = make_layer(in_channels, out_channels, stride).eval()
    ratios = norm_ratios(layer, in_channels)
    deviation = (ratios - 1).abs().max().item()
    assert deviation < 1e-3, f"max | ||f(x)|| / ||x|| - 1 | = {deviation:.3g} (tolerance 1e-3)"


@pytest.mark.parametrize('in_channels, out_channels, stride',
                         [(8, 3, 1), (8, 7, 1), (4, 8, 2), (3, 11, 2)])
def test_soc_never_increases_norm(in_channels, out_channels, stride):
    layer = make_layer(in_channels, out_channels, stride).eval()
    ratios = norm_ratios(layer, in_channels)
    assert ratios.max().item() <= 1 + 1e-3, f"max ||f(x)|| / ||x|| = {ratios.max().item():.6f}"


def test_soc_train_mode_nearly_preserves_norm():
    # K = 5 terms: the remainder is at most 0.7^6 / 6! = 1.6e-4 of the norm.
    layer = make_layer(4, 8).train()
    deviation = (norm_ratios(layer, 4) - 1).abs().max().item()
    assert deviation < 1e-3, f"max | ratio - 1 | = {deviation:.3g} in training mode"


def conv_operator_norm(A, size, iters=60):
    """Power iteration on x -> conv(x, A) with zero padding, as the layer applies it."""
    pad = A.shape[-1] // 2
    x = torch.randn(1, A.shape[1], size, size, dtype=A.dtype,
                    generator=torch.Generator().manual_seed(3))
    for _ in range(iters):
        x = F.conv_transpose2d(F.conv2d(x, A, padding=pad), A, padding=pad)  # A^T A x
        x = x / x.norm()
    return F.conv2d(x, A, padding=pad).norm().item()


@pytest.mark.parametrize('in_channels, out_channels, kernel_size',
                         [(3, 12, 3), (8, 8, 3), (6, 4, 5), (16, 16, 1)])
def test_soc_bound_above_operator_norm(in_channels, out_channels, kernel_size):
    layer = make_layer(in_channels, out_channels, kernel_size=kernel_size)
    A = layer.skew_filter().detach()
    bound = layer.spectral_bound().item()
    norm = conv_operator_norm(A, size=8)
    # A 1x1 filter makes the bound exact, so allow float32 round-off (relative 1e-5).
    assert bound >= norm * (1 - 1e-5), f"bound {bound:.7f} < operator norm {norm:.7f}"


@pytest.mark.parametrize('kernel_size', [1, 3, 5])
def test_soc_skew_filter_is_skew(kernel_size):
    layer = make_layer(5, 5, kernel_size=kernel_size)
    A = layer.skew_filter().detach().double()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 7, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 5, 7, 6, generator=generator, dtype=torch.float64)
    pad = kernel_size // 2
    Ax_y = (F.conv2d(x, A, padding=pad) * y).sum().item()
    x_Ay = (x * F.conv2d(y, A, padding=pad)).sum().item()
    assert abs(Ax_y + x_Ay) < 1e-10 * abs(Ax_y), f"<Ax, y> = {Ax_y}, <x, Ay> = {x_Ay}"
    assert torch.equal(transpose_filter(A), -A), "A^T != -A"


def power_buffers(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if k[:2] in ('u_', 'v_')}


def test_soc_power_buffers_in_state_dict():
    layer = make_layer(3, 8)
    buffers = power_buffers(layer)
    assert len(buffers) == 8, f"power-iteration buffers: {sorted(buffers)}"
    x = torch.randn(2, 3, 8, 8)

    # Evaluation leaves the buffers alone.
    layer.eval()
    layer(x)
    for name, value in power_buffers(layer).items():
        assert torch.equal(value, buffers[name]), f"{name} changed in eval mode"

    # Training updates them once P has changed.
    layer.train()
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    layer(x)
    changed = [name for name, value in power_buffers(layer).items()
               if not torch.equal(value, buffers[name])]
    assert len(changed) == 8, f"only {changed} changed in training mode"

    # A fresh layer loading the state gives the same output.
    other = make_layer(3, 8, seed=5)
    other.load_state_dict(layer.state_dict())
    layer.eval()
    other.eval()
    assert torch.equal(layer(x), other(x)), "loaded layer differs"


def test_soc_gradients_reach_filter():
    layer = make_layer(3, 16, stride=2, bias=True)
    x = torch.randn(2, 3, 8, 8)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0, "zero gradient on P"
    assert layer.bias.grad.abs().sum() > 0, "zero gradient on the bias"
    # A second forward after the buffers' in-place update keeps the first graph valid.
    y1 = layer(x)
    layer(x)
    y1.sum().backward()


def test_soc_invalid_arguments():
    with pytest.raises(ValueError, match='odd'):
        SkewOrthogonalConv2d(3, 8, kernel_size=4)
    with pytest.raises(ValueError, match='stride'):
        SkewOrthogonalConv2d(3, 8, stride=3)
    layer = make_layer(3, 8, stride=2)
    with pytest.raises(ValueError, match='even'):
        layer(torch.randn(1, 3, 7, 8))
    with pytest.raises(ValueError, match='input channels'):
        layer(torch.randn(1, 4, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA is not available')
def test_soc_runs_on_cuda():
    layer = make_layer(3, 12, stride=2, bias=True).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = layer(x)
    layer = layer.cuda()
    # TF32 convolutions (on by default in cuDNN) would round to about 1e-3.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = layer(x.cuda())
    diff = (y.cpu() - expected).abs().max().item()
    assert diff < 1e-4, f"max |CUDA - CPU| = {diff:.3g}"
    layer.train()
    layer(x.cuda()).sum().backward()
    assert layer.weight.grad.is_cuda and torch.isfinite(layer.weight.grad).all()
