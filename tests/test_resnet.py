"""CIFAR ResNets: architecture sizes, the stem norm, and the pre-SVD parameter."""
import pytest
import torch
from torch import nn

from models.resnet import ARCHS, cifar_resnet
from models.soc import SkewOrthogonalConv2d
from models.zca import ZCANormBatch

# Residual blocks per stage (He et al., arXiv 1512.03385, Table 1).
BLOCKS = {'resnet18': [2, 2, 2, 2], 'resnet34': [3, 4, 6, 3], 'resnet50': [3, 4, 6, 3],
          'resnet101': [3, 4, 23, 3]}
# Parameters of the usual CIFAR ResNets (3x3 stem, bias-free convolutions) with 10 classes.
PARAMETER_COUNTS = {'resnet18': 11_173_962, 'resnet50': 23_520_842}


@pytest.mark.parametrize('arch', tuple(ARCHS))
@pytest.mark.parametrize('norm', ('batchnorm', 'zcanormbatch'))
@pytest.mark.parametrize('ow', (False, True))
def test_builds_every_arch_norm_and_stem(arch, norm, ow):
    # On the meta device, layers get shapes but no storage, so even ResNet-101 builds at once.
    with torch.device('meta'):
        model = cifar_resnet(arch, num_classes=7, norm=norm, ow=ow, groups=2).eval()

    stages = [len(getattr(model, f'layer{i}')) for i in range(1, 5)]
    assert stages == BLOCKS[arch], f"blocks per stage {stages}"
    assert model.pre_svd_param is model.conv1.weight
    if ow:
        assert isinstance(model.conv1, SkewOrthogonalConv2d)
        assert model.pre_svd_param.shape == (64, 64, 3, 3), f"{model.pre_svd_param.shape}"
        assert (model.conv1.in_channels, model.conv1.out_channels) == (3, 64)
        assert model.conv1.stride == 1, f"stride {model.conv1.stride}"
    else:
        assert type(model.conv1) is nn.Conv2d
        assert model.pre_svd_param.shape == (64, 3, 3, 3), f"{model.pre_svd_param.shape}"
        assert model.conv1.stride == (1, 1), f"stride {model.conv1.stride}"
    assert any(p is model.pre_svd_param for p in model.parameters())

    # Only the stem norm may be the meta-layer; every other norm is a plain batch norm.
    zca = [m for m in model.modules() if isinstance(m, ZCANormBatch)]
    if norm == 'zcanormbatch':
        assert zca == [model.bn1], f"meta-layers {zca}"
        assert model.meta_layer is model.bn1
        assert model.meta_layer.groups == 2, f"groups {model.meta_layer.groups}"
    else:
        assert zca == [], f"meta-layers {zca}"
        assert model.meta_layer is None
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, SkewOrthogonalConv2d))]
    expected = len(convs) - (norm == 'zcanormbatch')
    assert len(batch_norms) == expected, f"{len(batch_norms)} batch norms, {len(convs)} convs"
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())

    # The meta-layer's forward enters torch.autocast, which rejects the meta device, so its
    # output shape is checked on real tensors below, for ResNet-18.
    if norm == 'batchnorm':
        with torch.no_grad():
            logits = model(torch.empty(2, 3, 32, 32, device='meta'))
        assert logits.shape == (2, 7), f"logits shape {tuple(logits.shape)}"


@pytest.mark.parametrize('arch', sorted(PARAMETER_COUNTS))
def test_parameter_count_matches_cifar_resnet(arch):
    with torch.device('meta'):
        model = cifar_resnet(arch, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMETER_COUNTS[arch], f"{arch}: {count} parameters"


@pytest.mark.parametrize('ow', (False, True))
def test_training_step_reaches_pre_svd_param(ow):
    torch.manual_seed(0)
    model = cifar_resnet('resnet18', num_classes=10, norm='zcanormbatch', ow=ow).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = model(images)
    assert logits.shape == (4, 10), f"logits shape {tuple(logits.shape)}"
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, labels).backward()

    grad = model.pre_svd_param.grad
    assert grad is not None and grad.shape == model.pre_svd_param.shape
    assert grad.abs().max() > 0, "the stem gradient is all zero"
    stats = model.meta_layer.last_stats
    assert stats['kappa'] >= 1.0, f"kappa {stats['kappa']}"
    if not ow:
        # A 3 -> 64 convolution with 3x3 filters spans at most 27 directions.
        assert stats['rank'] <= 27, f"rank {stats['rank']} of a 3x3x3 stem covariance"


def test_rejects_unknown_arch_and_norm():
    with pytest.raises(ValueError, match='resnet18'):
        cifar_resnet('resnet20', num_classes=10)
    with pytest.raises(ValueError, match='zcanormbatch'):
        cifar_resnet('resnet18', num_classes=10, norm='groupnorm')
