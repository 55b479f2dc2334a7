"""Pieces shared by the CNN families: channel scaling, the linear head, init, conv-BN-ReLU."""

from __future__ import annotations

from torch import nn


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, round(channels * width))


def head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout (if any) then the linear classifier; index ``-1`` is the ``nn.Linear``."""
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def init_cnn(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as in torchvision's ResNet), unit-scale BatchNorm, zero
    biases; linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (padding 1, no bias: BN follows) -> BN -> ReLU, ``(N, cin, H, W) -> (N, cout,
    H / stride, W / stride)``; a list to splice into an ``nn.Sequential``."""
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def blocks_per_stage(model: str, depth: object, offset: int, examples: str, layout: str) -> int:
    """``n`` for a CIFAR-style ``depth = 6n + offset`` (3 stages of n blocks of 2 convs, plus
    ``offset`` other layers); ``ValueError`` naming the rule otherwise."""
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 6 + offset
        or (depth - offset) % 6
    ):
        raise ValueError(
            f"depth for {model} must be 6n + {offset} with n >= 1 ({examples}): {layout}; "
            f"got {depth!r}"
        )
    return (depth - offset) // 6
