"""Checks that need a GPU: CUDA results against CPU ones, and mixed-precision trainer steps.

The device comes from the environment variable GPU_TEST_DEVICE (default ``cuda``). Every test
here is marked ``gpu`` and skips when that device is CUDA and no CUDA device is present, so a
plain ``pytest`` run on a CPU machine skips them all. ``GPU_TEST_DEVICE=cpu`` runs them on the
CPU against itself, which checks the test code but not CUDA. benchmarks/gpu_check.sh runs
them with ``pytest -m gpu``.
"""
import math
import os

import pytest
import torch

from benchmarks import benchmark
from models.orthogonality import nearest_orthogonal
from models.soc import SkewOrthogonalConv2d
from models.zca import BACKENDS, ZCANormBatch

DEVICE = torch.device(os.environ.get('GPU_TEST_DEVICE', 'cuda'))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == 'cuda' and not torch.cuda.is_available(),
                       reason=f"GPU_TEST_DEVICE={DEVICE} but no CUDA device is available"),
]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| / max |expected|, computed on the CPU in float64."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('groups', [1, 4])
def test_meta_layer_matches_cpu(backend, groups):
    torch.manual_seed(0)
    x = torch.randn(16, 32, 8, 8, dtype=torch.float64)
    grad_y = torch.randn_like(x)
    results = {}
    for device in ('cpu', DEVICE):
        torch.manual_seed(1)
        layer = ZCANormBatch(32, groups=groups, backend=backend).double().to(device)
        x_dev = x.to(device).requires_grad_()
        y = layer(x_dev)
        y.backward(grad_y.to(device))
        results[str(device)] = (y, x_dev.grad, layer.running_whitening)
    cpu, dev = results['cpu'], results[str(DEVICE)]
    # float64 throughout, so CUDA and CPU eigensolvers should agree far below the 1e-8 bound.
    for name, a, b in zip(('output', 'input gradient', 'running whitening'), dev, cpu):
        error = max_relative_error(a, b)
        assert error < 1e-8, f"{backend}, groups {groups}: {name} differs by {error:.2e}"


def test_meta_layer_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = ZCANormBatch(16).to(DEVICE)
    x = torch.randn(8, 16, 8, 8, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    assert y.dtype == torch.float32, f"output dtype {y.dtype}, expected the input's float32"
    assert bool(torch.isfinite(x.grad).all()), "non-finite input gradient"
    residual = layer.last_stats['whitening_residual']
    assert residual < 1e-8, f"whitening residual {residual:.2e} under autocast"


def test_soc_matches_cpu():
    torch.manual_seed(0)
    conv = SkewOrthogonalConv2d(8, 8, 3)
    x = torch.randn(4, 8, 12, 12)
    conv.eval()
    with torch.no_grad():
        expected = conv(x)
        actual = conv.to(DEVICE)(x.to(DEVICE))
    error = max_relative_error(actual, expected)
    assert error < 1e-4, f"SOC output differs from the CPU by {error:.2e}"
    norm_ratio = float(actual.norm() / x.norm())
    assert abs(norm_ratio - 1) < 1e-3, f"SOC changed the norm by the factor {norm_ratio:.6f}"


@pytest.mark.parametrize('method', ['svd', 'newton_schulz'])
@pytest.mark.parametrize('shape', [(64, 27), (30, 1024), (6, 8192)])
def test_nog_matches_cpu(method, shape):
    L = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    expected, rank_cpu = nearest_orthogonal(L, method)
    actual, rank = nearest_orthogonal(L.to(DEVICE), method)
    assert rank == rank_cpu, f"rank {rank} on {DEVICE}, {rank_cpu} on the CPU"
    # float32 products on a GPU (TF32 is off by default for matmul) and on the CPU.
    error = max_relative_error(actual, expected)
    assert error < 1e-4, f"{method} {shape}: polar factor differs by {error:.2e}"


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
@pytest.mark.parametrize('trainer', benchmark.TRAINERS)
def test_trainer_steps_finite_under_autocast(trainer, amp):
    if amp == 'fp16' and DEVICE.type == 'cpu' and trainer == 'cifar':
        pytest.skip("float16 convolutions on the CPU take minutes; this case is for CUDA")
    torch.manual_seed(0)
    sizes = benchmark.TRAINER_SIZES['tiny'][trainer]
    step, orth, _ = benchmark.STEP_BUILDERS[trainer](sizes, DEVICE, amp, nog_olr=True)
    losses = [float(step()) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses), f"{trainer} {amp} losses {losses}"
    # Every step reaches NOG/OLR once. Under fp16 the first steps may overflow at the initial
    # loss scale, and NOG then skips them (the scaler backs off), so only bf16 must apply all.
    counts = orth.state_dict()
    assert counts['applied'] + counts['skipped'] == 3, f"NOG/OLR calls: {counts}"
    if amp == 'bf16':
        assert counts['skipped'] == 0, f"bf16 gradients were skipped: {counts}"
