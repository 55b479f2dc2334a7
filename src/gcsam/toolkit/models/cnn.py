"""``small-cnn``: a fast baseline, two blocks of (conv-BN-ReLU) x 2 + max-pool.

Speed, training at 32x32 on 2 CPU cores: about 3,000 img/s at ``width=1`` (16/32 channels),
1,100 img/s at ``width=2`` (32/64 channels). The max-pools round up, so a 1x1 map stays 1x1 and
any input size works.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._layers import conv_bn_relu, head, init_cnn, scaled
from .registry import register_model


class SmallCNN(nn.Module):
    """(conv-BN-ReLU x 2, max-pool) x 2 -> global average pool -> [dropout] -> linear.

    ``(N, C, H, W) -> (N, num_classes)``; channels 16 and 32 scaled by ``width``.
    """

    def __init__(
        self, num_classes: int, in_channels: int, width: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        c1, c2 = scaled(16, width), scaled(32, width)
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, c1),
            *conv_bn_relu(c1, c1),
            nn.MaxPool2d(2, ceil_mode=True),  # ceil: a 1-pixel map stays 1x1
            *conv_bn_relu(c1, c2),
            *conv_bn_relu(c2, c2),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head(c2, num_classes, dropout)
        init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@register_model(
    "small-cnn",
    summary="fast baseline: 2 x (conv-BN-ReLU x 2, max-pool), 16/32 channels x width, linear head",
    aliases=("smallcnn", "cnn"),
)
def small_cnn(
    num_classes: int, in_channels: int, image_size: int, *, width: float, dropout: float
) -> SmallCNN:
    """:class:`SmallCNN`; any ``image_size``."""
    return SmallCNN(num_classes, in_channels, width, dropout)


class ConvNet(nn.Module):
    """(conv-BN-ReLU, max-pool) x 2 -> flatten -> linear-BN-ReLU -> [dropout] -> linear.

    ``(N, C, S, S) -> (N, num_classes)``; channels 32 and 64 and 128 hidden units scaled by
    ``width``. The flattened map (not a global pool) is what lets it fit 28x28 data in a couple of
    epochs; about 420k parameters on 28x28.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2, hidden = scaled(32, width), scaled(64, width), scaled(128, width)
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, c1),
            nn.MaxPool2d(2, ceil_mode=True),
            *conv_bn_relu(c1, c2),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.hidden = nn.Sequential(
            nn.Linear(c2 * side * side, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self.head = head(hidden, num_classes, dropout)
        init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(torch.flatten(self.features(x), 1)))


@register_model(
    "convnet",
    summary="2 x (conv-BN-ReLU, max-pool), 32/64 channels, flatten, 128-unit BN hidden layer; "
    "the 28x28 default (~420k parameters)",
)
def convnet(
    num_classes: int, in_channels: int, image_size: int, *, width: float, dropout: float
) -> ConvNet:
    """:class:`ConvNet` for ``image_size`` inputs (its hidden layer grows with the image area)."""
    return ConvNet(num_classes, in_channels, image_size, width, dropout)
