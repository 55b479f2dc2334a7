"""``vgg16``: VGG-16 (config D) with BatchNorm, a CIFAR design at every input size (its cost grows
with ``image_size ** 2``).

Small inputs: max-pools that would take the map below 1x1 are skipped (an 8x8 input keeps three
of five), and adaptive average pooling lets a model run at any input size >= the one it was
built for. BatchNorm in training mode needs batches of at least 2 once the map is 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_relu, init_cnn, scaled
from .registry import register_model

_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG with BatchNorm: 3x3 conv-BN-ReLU layers and max-pools per ``cfg``, adaptive average
    pool, classifier ``Linear(c, hidden) -> ReLU -> [Dropout] -> Linear(hidden, num_classes)``.

    ``(N, C, H, W) -> (N, num_classes)``; ``image_size`` decides which max-pools are kept.
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for item in cfg:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                cout = scaled(int(item), width)
                layers += conv_bn_relu(cin, cout)
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden),
            nn.ReLU(inplace=True),
            *([nn.Dropout(dropout)] if dropout > 0 else []),
        )
        self.head = nn.Linear(hidden, num_classes)
        init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.head(self.classifier(x))


@register_model(
    "vgg16",
    summary="VGG-16 (config D) with BatchNorm, channels x width, one hidden classifier layer",
    aliases=("vgg",),
)
def vgg16(
    num_classes: int, in_channels: int, image_size: int, *, width: float, dropout: float
) -> VGG:
    """VGG-16; ``dropout`` sits in the hidden classifier layer."""
    return VGG(_VGG16_CFG, num_classes, in_channels, image_size, width, dropout)
