"""CIFAR ResNets whose first norm is the SVD meta-layer.

The networks follow He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016,
arXiv 1512.03385), in the form used for 32x32 images. A 3x3 stem convolution with stride 1 and
no max-pool is followed by four stages of 64, 128, 256 and 512 base channels at strides 1, 2,
2 and 2.

For Song, Sebe and Wang, "Improving Covariance Conditioning of the SVD Meta-layer by
Orthogonality" (ECCV 2022, arXiv 2207.02119), only the norm after the stem can be the SVD
meta-layer (ZCA whitening, `ZCANormBatch`). Every other norm is a plain `nn.BatchNorm2d`. The stem
convolution `3 -> 64` is the pre-SVD layer whose weight NOG and OLR act on. Under OW it is a skew
orthogonal convolution (Singla and Feizi, ICML 2021, arXiv 2105.11417), and NOG and OLR act on
its free filter instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.soc import SkewOrthogonalConv2d
from models.zca import ZCANormBatch

NORMS = ('batchnorm', 'zcanormbatch')
STEM_CHANNELS = 64


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity or 1x1 projection shortcut.

    Computes `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, mapping
    `(N, in_channels, H, W)` to `(N, channels, H/stride, W/stride)`.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class Bottleneck(nn.Module):
    """A 1x1 reduction, a 3x3 convolution and a 1x1 expansion by 4, with a shortcut.

    Maps `(N, in_channels, H, W)` to `(N, 4 * channels, H/stride, W/stride)`. The stride sits
    on the 3x3 convolution, as in torchvision's ResNet v1.5.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    'resnet18': (BasicBlock, (2, 2, 2, 2)),
    'resnet34': (BasicBlock, (3, 4, 6, 3)),
    'resnet50': (Bottleneck, (3, 4, 6, 3)),
    'resnet101': (Bottleneck, (3, 4, 23, 3)),
}


class CIFARResNet(nn.Module):
    """A ResNet for 32x32 images whose stem norm may be the ZCA-whitening meta-layer.

    Input `(N, 3, 32, 32)`, output logits `(N, num_classes)`. With `norm='zcanormbatch'` the
    64 stem channels `x` are whitened per group as `Sigma^{-1/2} (x - mu)` with
    `Sigma = cov(x) + eps * I`, followed by a per-channel affine transform.

    Attributes:
        pre_svd_param: the parameter that NOG and OLR act on. This is the stem convolution's
            weight `(64, 3, 3, 3)`, or under `ow` the skew orthogonal convolution's free filter
            `P` of shape `(64, 64, 3, 3)`.
        meta_layer: the `ZCANormBatch` after the stem, or None under `norm='batchnorm'`.

    NOTE: the published implementation builds the OLR parameter group by name after wrapping
    the model, which leaves the group empty on CUDA. Callers here select `pre_svd_param` by
    identity, so wrapping cannot empty the group.
    """

    def __init__(self, block: type[nn.Module], num_blocks: tuple[int, ...], num_classes: int,
                 norm: str = 'batchnorm', ow: bool = False, groups: int = 1,
                 eps: float = 1e-2, svd_backend: str = 'svd', zca_momentum: float = 0.1):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if ow:
            self.conv1 = SkewOrthogonalConv2d(3, STEM_CHANNELS, 3, stride=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, 1, padding=1, bias=False)
        if norm == 'zcanormbatch':
            self.bn1 = ZCANormBatch(STEM_CHANNELS, groups=groups, eps=eps,
                                    momentum=zca_momentum, backend=svd_backend)
        else:
            self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)

        stages = []
        in_channels = STEM_CHANNELS
        for i, (channels, count) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(block(in_channels, channels, stride if j == 0 else 1))
                in_channels = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)

    @property
    def pre_svd_param(self) -> nn.Parameter:
        """The weight of the pre-SVD layer: the stem convolution or its free SOC filter."""
        return self.conv1.weight

    @property
    def meta_layer(self) -> ZCANormBatch | None:
        """The SVD meta-layer after the stem, or None when the stem norm is batch norm."""
        return self.bn1 if isinstance(self.bn1, ZCANormBatch) else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))  # (N, 64, 32, 32)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))  # (N, 512 * expansion, 4, 4)
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # (N, 512 * expansion)
        return self.fc(h)


def cifar_resnet(arch: str, num_classes: int, norm: str = 'batchnorm', ow: bool = False,
                 groups: int = 1, eps: float = 1e-2, svd_backend: str = 'svd',
                 zca_momentum: float = 0.1) -> CIFARResNet:
    """Build a CIFAR ResNet-18, -34, -50 or -101 (`arch` one of `ARCHS`).

    `norm` chooses the stem norm ('batchnorm' or 'zcanormbatch'); `groups`, `eps`,
    `svd_backend` and `zca_momentum` configure the ZCA meta-layer and are ignored under batch
    norm. `ow` makes the stem a skew orthogonal convolution `3 -> 64` with stride 1.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    block, num_blocks = ARCHS[arch]
    return CIFARResNet(block, num_blocks, num_classes, norm=norm, ow=ow, groups=groups,
                       eps=eps, svd_backend=svd_backend, zca_momentum=zca_momentum)
