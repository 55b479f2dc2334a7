"""``vit``: a small pre-norm Vision Transformer (ViT-Tiny-like: dim 192 x width, 3 heads).

Unlike the CNNs it needs inputs of exactly the ``image_size`` it was built for: the learned
position embedding has one entry per patch. The default patch size gives a 4x4 grid of patches
(:func:`default_patch_size`), so the cost barely depends on ``image_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..._util.validate import check_int
from .registry import register_model

# ViT-Tiny's head count and width; ``width`` scales the dim, kept a multiple of the heads.
_HEADS = 3
_DIM = 192


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
        dim: int = _DIM,
        depth: int = 6,
        heads: int = _HEADS,
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


@register_model(
    "vit",
    summary="small pre-norm Vision Transformer (ViT-Tiny-like: dim 192 x width, 3 heads, "
    "depth 6); needs inputs of exactly image_size",
    options=("depth", "patch_size"),
)
def vit(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    width: float,
    dropout: float,
    depth: int | None = None,
    patch_size: int | None = None,
) -> VisionTransformer:
    """ViT with ``depth`` blocks (default 6) of dim ``192 * width`` rounded to a multiple of its 3
    heads, ``patch_size`` (default :func:`default_patch_size`) dividing ``image_size``;
    ``dropout`` after the attention and MLP layers."""
    depth = check_int("depth", 6 if depth is None else depth, 1)
    if patch_size is None:
        patch_size = default_patch_size(image_size)
    patch_size = check_int("patch_size", patch_size, 1)
    if image_size % patch_size:
        raise ValueError(
            f"patch_size {patch_size} must divide image_size {image_size} "
            f"(image_size % patch_size = {image_size % patch_size})"
        )
    dim = max(_HEADS, _HEADS * round(_DIM * width / _HEADS))
    return VisionTransformer(
        num_classes, in_channels, image_size, patch_size, dim=dim, depth=depth, dropout=dropout
    )
