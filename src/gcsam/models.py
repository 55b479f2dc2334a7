"""Image classifiers in plain torch for the experiment toolkit.

Every model maps ``(N, in_channels, image_size, image_size)`` to logits ``(N, num_classes)`` and
ends in a linear layer named ``head``. Build one with :func:`build_model`:

=============  ==============================================================================
``small-cnn``  two blocks of (conv-BN-ReLU) x 2 + max-pool (16, 32 channels x width), global
               average pool, linear head; a fast baseline (~3,000 img/s training at 32x32 on 2
               CPU cores; ``width=2`` gives 32/64 channels at ~1,100 img/s)
``resnet18``   ResNet-18, BasicBlock [2, 2, 2, 2], 64/128/256/512 channels x width
``resnet20``   He et al.'s CIFAR ResNet (``depth`` = 6n + 2, default 20), 16/32/64 channels x
               width, parameter-free (zero-padding, "option A") shortcuts
``resnet50``   ResNet-50, Bottleneck [3, 4, 6, 3], 64/128/256/512 (x4 out) channels x width
``vgg16``      VGG-16 (config D) with BatchNorm, channels x width, one hidden classifier layer
``wrn``        pre-activation WideResNet-``depth``-``widen_factor`` (default WRN-16-8)
``vit``        small pre-norm Vision Transformer (ViT-Tiny-like: dim 192 x width, 3 heads)
=============  ==============================================================================

Stem rule for ``resnet18`` and ``resnet50``: ``image_size >= 128`` gets the ImageNet stem (7x7
stride-2 conv + 3x3 stride-2 max-pool, 4x less resolution, so 224-256 px inputs are affordable);
smaller inputs get the CIFAR stem (3x3 stride-1 conv, no pool), which keeps the detail of 8-64
px images. ``resnet20``, ``wrn`` and ``vgg16`` are CIFAR designs at every size; their cost grows
with ``image_size ** 2``.

Small inputs: a 3x3 stride-2 convolution (padding 1) and the stride-2 pools used here map a 1x1
map to 1x1, so feature maps never shrink below 1x1 (an 8x8 digit reaches 1x1 in ResNet-18's last
stage); VGG skips the max-pools that would. Every CNN ends in adaptive average pooling, so it runs
at any input size >= the ``image_size`` it was built for; the ViT needs exactly ``image_size``.
BatchNorm in training mode needs more than one value per channel: with a 1x1 last stage, train
with batches of at least 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["MODELS", "build_model", "describe_model"]

MODELS: tuple[str, ...] = ("small-cnn", "resnet18", "resnet20", "resnet50", "vgg16", "wrn", "vit")

# Inputs at least this large get the ImageNet stem in resnet18/resnet50.
IMAGENET_STEM_MIN_SIZE = 128

_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, round(channels * width))


def _head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout (if any) then the linear classifier; index ``-1`` is the ``nn.Linear``."""
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def _init_cnn(model: nn.Module) -> None:
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


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


# --------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """(conv-BN-ReLU x 2, max-pool) x 2 -> global average pool -> linear.

    ``(N, C, H, W) -> (N, num_classes)``; channels 16 and 32 scaled by ``width``: small enough
    to train at about 3,000 img/s on 2 CPU cores at 32x32.
    """

    def __init__(
        self, num_classes: int, in_channels: int, width: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        c1, c2 = _scaled(16, width), _scaled(32, width)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            *_conv_bn_relu(c1, c1),
            nn.MaxPool2d(2, ceil_mode=True),  # ceil: a 1-pixel map stays 1x1
            *_conv_bn_relu(c1, c2),
            *_conv_bn_relu(c2, c2),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = _head(c2, num_classes, dropout)
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- ResNets


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


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: 1x1 conv + BN."""
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
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != planes:
            if pad_shortcut:
                self.shortcut = _PadShortcut(stride, planes - cin)
            else:
                self.shortcut = _projection(cin, planes, stride)

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
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if pad_shortcut:
                self.shortcut = _PadShortcut(stride, cout - cin)
            else:
                self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """Stem -> stages of residual blocks (first block of each later stage strides 2) -> global
    average pool -> linear. ``(N, C, H, W) -> (N, num_classes)``.

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
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(*_conv_bn_relu(in_channels, stem_channels))
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
        self.head = _head(cin, num_classes, dropout)
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    """VGG with BatchNorm: 3x3 conv-BN-ReLU layers and max-pools per ``cfg``, adaptive average
    pool, classifier ``Linear(c, hidden) -> ReLU -> Dropout -> Linear(hidden, num_classes)``.

    Max-pools that would take the map below 1x1 are skipped (an 8x8 input keeps three of five).
    ``(N, C, H, W) -> (N, num_classes)``.
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
                cout = _scaled(int(item), width)
                layers += _conv_bn_relu(cin, cout)
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden),
            nn.ReLU(inplace=True),
            *([nn.Dropout(dropout)] if dropout > 0 else []),
        )
        self.head = nn.Linear(hidden, num_classes)
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.head(self.classifier(x))


# --------------------------------------------------------------------------- WideResNet


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
        channels = [_scaled(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor)]
        channels.append(_scaled(64 * widen_factor, width))
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
        _init_cnn(self)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.groups(self.stem(x))), inplace=True)
        return self.head(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention, ``(N, L, dim) -> (N, L, dim)``; one fused qkv projection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, length, dim)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        drop: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            nn.GELU(),
            *drop,
            nn.Linear(mlp_ratio * dim, dim),
            *drop,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: ``patch_size`` x ``patch_size`` patch-embedding conv, class token, learned position
    embedding, ``depth`` pre-norm encoder blocks, LayerNorm, linear head on the class token.
    ``(N, C, image_size, image_size) -> (N, num_classes)``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        patch_size: int,
        *,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.blocks = nn.Sequential(
            *(EncoderBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        # The usual ViT init (timm): truncated normal(0.02) for tokens and linear layers. The
        # patch conv keeps PyTorch's default (Kaiming-uniform) init.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT built for {self.image_size}x{self.image_size} inputs got "
                f"{tuple(x.shape[-2:])}: the position embedding has a fixed number of patches"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, num_patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x[:, 0]))


def default_patch_size(image_size: int) -> int:
    """``image_size // 4`` rounded down to a divisor of ``image_size``, at least 1: a 4x4 grid of
    patches where the size allows (8 px -> 2, 28 -> 7, 32 -> 8, 224 -> 56; 30 -> 6)."""
    patch = max(1, image_size // 4)
    while image_size % patch:
        patch -= 1
    return patch


# --------------------------------------------------------------------------- factory


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _normalize_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, one of {', '.join(MODELS)}; got {name!r}")
    key = name.strip().lower().replace("_", "-")
    aliases = {
        "smallcnn": "small-cnn",
        "cnn": "small-cnn",
        "wideresnet": "wrn",
        "wide-resnet": "wrn",
        "vgg": "vgg16",
    }
    key = aliases.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODELS)}")
    return key


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    width: float = 1.0,
    depth: int | None = None,
    patch_size: int | None = None,
    widen_factor: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Build classifier ``name`` (one of :data:`MODELS`) for square ``image_size`` inputs with
    ``in_channels`` channels: ``(N, in_channels, image_size, image_size) -> (N, num_classes)``.

    ``width`` scales every channel count (and the ViT's dim, ``192 * width`` rounded to a multiple
    of its 3 heads). ``depth``: ``resnet20`` 6n + 2 (default 20), ``wrn`` 6n + 4 (default 16),
    ``vit`` number of blocks (default 6); other models reject it. ``widen_factor`` (``wrn`` only,
    default 8) and ``patch_size`` (``vit`` only, default :func:`default_patch_size`).
    ``dropout``: before the linear head of the CNNs and ResNets, in the VGG classifier, inside
    each WRN block, and after the ViT's attention and MLP layers.

    The weights come from torch's global generator: the same ``torch.manual_seed`` builds the
    same model. Raises ``ValueError`` naming the argument for invalid arguments.
    """
    key = _normalize_name(name)
    num_classes = _check_int("num_classes", num_classes, 2)
    in_channels = _check_int("in_channels", in_channels, 1)
    image_size = _check_int("image_size", image_size, 4)
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"width must be a number > 0, got {width!r}")
    if not math.isfinite(width):
        raise ValueError(f"width must be finite, got {width!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    for arg, value, owner in (
        ("depth", depth, ("resnet20", "wrn", "vit")),
        ("patch_size", patch_size, ("vit",)),
        ("widen_factor", widen_factor, ("wrn",)),
    ):
        if value is not None and key not in owner:
            raise ValueError(f"{arg} applies only to {', '.join(owner)}, not {key}")

    if key == "small-cnn":
        return SmallCNN(num_classes, in_channels, width, dropout)
    if key in ("resnet18", "resnet50"):
        resnet50 = key == "resnet50"
        return ResNet(
            Bottleneck if resnet50 else BasicBlock,
            (3, 4, 6, 3) if resnet50 else (2, 2, 2, 2),
            tuple(_scaled(c, width) for c in (64, 128, 256, 512)),
            num_classes,
            in_channels,
            stem_channels=_scaled(64, width),
            imagenet_stem=image_size >= IMAGENET_STEM_MIN_SIZE,
            dropout=dropout,
        )
    if key == "resnet20":
        depth = 20 if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"depth for resnet20 must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...): "
                f"3 stages of n BasicBlocks of 2 convs, plus the stem conv and the head; "
                f"got {depth!r}"
            )
        n = (depth - 2) // 6
        return ResNet(
            BasicBlock,
            (n, n, n),
            tuple(_scaled(c, width) for c in (16, 32, 64)),
            num_classes,
            in_channels,
            stem_channels=_scaled(16, width),
            pad_shortcut=True,
            dropout=dropout,
        )
    if key == "vgg16":
        return VGG(_VGG16_CFG, num_classes, in_channels, image_size, width, dropout)
    if key == "wrn":
        depth = 16 if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"depth for wrn must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...): 3 groups "
                f"of n blocks of 2 convs, plus the stem conv and the 3 shortcut convs; "
                f"got {depth!r}"
            )
        widen_factor = _check_int("widen_factor", 8 if widen_factor is None else widen_factor, 1)
        return WideResNet(depth, widen_factor, num_classes, in_channels, width, dropout)
    # vit
    depth = _check_int("depth", 6 if depth is None else depth, 1)
    if patch_size is None:
        patch_size = default_patch_size(image_size)
    patch_size = _check_int("patch_size", patch_size, 1)
    if image_size % patch_size:
        raise ValueError(
            f"patch_size {patch_size} must divide image_size {image_size} "
            f"(image_size % patch_size = {image_size % patch_size})"
        )
    heads = 3
    dim = max(heads, heads * round(192 * width / heads))
    return VisionTransformer(
        num_classes,
        in_channels,
        image_size,
        patch_size,
        dim=dim,
        depth=depth,
        heads=heads,
        dropout=dropout,
    )


def describe_model(model: nn.Module) -> dict:
    """``{"parameters": total element count, "tensors": number of parameter tensors}`` (shared
    parameters counted once)."""
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params), "tensors": len(params)}
