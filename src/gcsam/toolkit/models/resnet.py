"""ResNets: ``resnet18`` and ``resnet50`` (ImageNet designs) and ``resnet20`` (He et al.'s CIFAR
family, ``depth`` = 6n + 2).

Stem rule for ``resnet18`` and ``resnet50``: ``image_size >= IMAGENET_STEM_MIN_SIZE`` (128) gets
the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool, 4x less resolution, so 224-256 px
inputs are affordable); smaller inputs get the CIFAR stem (3x3 stride-1 conv, no pool), which
keeps the detail of 8-64 px images. ``resnet20`` always has the CIFAR stem; its cost grows with
``image_size ** 2``.

Small inputs: a 3x3 stride-2 convolution (padding 1) maps a 1x1 map to 1x1, so feature maps never
shrink below 1x1 (an 8x8 digit reaches 1x1 in ResNet-18's last stage). BatchNorm in training mode
needs more than one value per channel: with a 1x1 last stage, train with batches of at least 2.
Adaptive average pooling lets a model run at any input size >= the one it was built for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ._layers import blocks_per_stage, conv_bn_relu, head, init_cnn, scaled
from .registry import register_model

# Inputs at least this large get the ImageNet stem in resnet18/resnet50.
IMAGENET_STEM_MIN_SIZE = 128


class _PadShortcut(nn.Module):
    """He et al.'s "option A" shortcut: subsample by ``stride`` and zero-pad the new channels
    (split evenly before and after); no parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = extra_channels // 2
        self.after = extra_channels - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


def _shortcut(cin: int, cout: int, stride: int, pad_shortcut: bool) -> nn.Module:
    """Identity when the shape is kept, else option A (zero-pad) or option B (1x1 conv + BN)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if pad_shortcut:
        return _PadShortcut(stride, cout - cin)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, pad_shortcut: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride, pad_shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's "v1.5"), 1x1 expand x4, residual."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, pad_shortcut: bool = False) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride, pad_shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def _stem(in_channels: int, cout: int, imagenet: bool) -> nn.Sequential:
    """ImageNet stem (7x7 stride-2 conv-BN-ReLU + 3x3 stride-2 max-pool) or one 3x3 conv-BN-ReLU."""
    if not imagenet:
        return nn.Sequential(*conv_bn_relu(in_channels, cout))
    return nn.Sequential(
        nn.Conv2d(in_channels, cout, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


class ResNet(nn.Module):
    """Stem -> stages of residual blocks (first block of each later stage strides 2) -> global
    average pool -> [dropout] -> linear. ``(N, C, H, W) -> (N, num_classes)``.

    ``imagenet_stem``: 7x7 stride-2 conv + 3x3 stride-2 max-pool instead of one 3x3 conv.
    ``pad_shortcut``: parameter-free option-A shortcuts (CIFAR ResNet-20/32/...).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: tuple[int, ...],
        stage_channels: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        *,
        stem_channels: int,
        imagenet_stem: bool = False,
        pad_shortcut: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.imagenet_stem = imagenet_stem
        self.stem = _stem(in_channels, stem_channels, imagenet_stem)
        stages: list[nn.Module] = []
        cin = stem_channels
        for i, (n, planes) in enumerate(zip(blocks_per_stage, stage_channels, strict=True)):
            layers: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(block(cin, planes, stride, pad_shortcut))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head(cin, num_classes, dropout)
        init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def _imagenet_resnet(
    block: type[BasicBlock | Bottleneck],
    blocks_per_stage: tuple[int, ...],
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float,
    dropout: float,
) -> ResNet:
    """ResNet-18/50 layout: 64/128/256/512 channels x width, stem by the module's stem rule."""
    return ResNet(
        block,
        blocks_per_stage,
        tuple(scaled(c, width) for c in (64, 128, 256, 512)),
        num_classes,
        in_channels,
        stem_channels=scaled(64, width),
        imagenet_stem=image_size >= IMAGENET_STEM_MIN_SIZE,
        dropout=dropout,
    )


@register_model(
    "resnet18",
    summary="ResNet-18, BasicBlock [2, 2, 2, 2], 64/128/256/512 channels x width; "
    "ImageNet stem from 128 px",
)
def resnet18(
    num_classes: int, in_channels: int, image_size: int, *, width: float, dropout: float
) -> ResNet:
    """ResNet-18; ImageNet stem from ``IMAGENET_STEM_MIN_SIZE`` px."""
    return _imagenet_resnet(
        BasicBlock, (2, 2, 2, 2), num_classes, in_channels, image_size, width, dropout
    )


@register_model(
    "resnet20",
    summary="He et al.'s CIFAR ResNet, depth 6n + 2 (default 20), 16/32/64 channels x width, "
    "parameter-free (option A) shortcuts",
    options=("depth",),
)
def resnet20(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    width: float,
    dropout: float,
    depth: int | None = None,
) -> ResNet:
    """CIFAR ResNet-``depth`` (20, 32, 44, 56, 110, ...): 3 stages of (depth - 2) / 6 blocks."""
    n = blocks_per_stage(
        "resnet20",
        20 if depth is None else depth,
        2,
        "8, 14, 20, 32, 44, 56, 110, ...",
        "3 stages of n BasicBlocks of 2 convs, plus the stem conv and the head",
    )
    return ResNet(
        BasicBlock,
        (n, n, n),
        tuple(scaled(c, width) for c in (16, 32, 64)),
        num_classes,
        in_channels,
        stem_channels=scaled(16, width),
        pad_shortcut=True,
        dropout=dropout,
    )


@register_model(
    "resnet50",
    summary="ResNet-50, Bottleneck [3, 4, 6, 3], 64/128/256/512 (x4 out) channels x width; "
    "ImageNet stem from 128 px",
)
def resnet50(
    num_classes: int, in_channels: int, image_size: int, *, width: float, dropout: float
) -> ResNet:
    """ResNet-50 ("v1.5"); ImageNet stem from ``IMAGENET_STEM_MIN_SIZE`` px."""
    return _imagenet_resnet(
        Bottleneck, (3, 4, 6, 3), num_classes, in_channels, image_size, width, dropout
    )
