"""``wrn``: pre-activation WideResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis), a CIFAR
design at every input size (its cost grows with ``image_size ** 2``).

Strided 3x3 convolutions (padding 1) map a 1x1 map to 1x1, so tiny inputs work; BatchNorm in
training mode then needs batches of at least 2. Adaptive average pooling lets a model run at any
input size >= the one it was built for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..._util.validate import check_int
from ._layers import blocks_per_stage, init_cnn, scaled
from .registry import register_model


class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3 (strided) - BN-ReLU-[dropout]-conv3x3, plus the
    input (or a 1x1 conv of the pre-activated input when the shape changes), as in Zagoruyko &
    Komodakis's reference implementation."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out), inplace=True)))
        # The projection sees the pre-activated input; the identity path the raw one.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: 3x3 conv (16 x width) -> 3 groups of ``(depth - 4) / 6``
    wide blocks (16k, 32k, 64k channels x width; strides 1, 2, 2) -> BN-ReLU -> global average
    pool -> linear. ``(N, C, H, W) -> (N, num_classes)``."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        channels = [scaled(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor)]
        channels.append(scaled(64 * widen_factor, width))
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        cin = channels[0]
        for i, cout in enumerate(channels[1:]):
            blocks = [
                WideBlock(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1, dropout)
                for j in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)
        init_cnn(self)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.groups(self.stem(x))), inplace=True)
        return self.head(torch.flatten(self.pool(x), 1))


@register_model(
    "wrn",
    summary="pre-activation WideResNet-depth-widen_factor, depth 6n + 4 (default WRN-16-8)",
    options=("depth", "widen_factor"),
    aliases=("wideresnet", "wide-resnet"),
)
def wrn(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    width: float,
    dropout: float,
    depth: int | None = None,
    widen_factor: int | None = None,
) -> WideResNet:
    """WRN-``depth`` (default 16) - ``widen_factor`` (default 8); ``dropout`` inside each block."""
    depth = 16 if depth is None else depth
    blocks_per_stage(
        "wrn",
        depth,
        4,
        "10, 16, 22, 28, 40, ...",
        "3 groups of n blocks of 2 convs, plus the stem conv and the 3 shortcut convs",
    )
    widen_factor = check_int("widen_factor", 8 if widen_factor is None else widen_factor, 1)
    return WideResNet(depth, widen_factor, num_classes, in_channels, width, dropout)
