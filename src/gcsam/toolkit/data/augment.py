"""Batched, seeded training augmentation on uint8 or float image tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..._util.validate import check_int

# The augmentation names a data set may default to (``DatasetSpec.default_augment``).
AUGMENTATIONS: tuple[str, ...] = ("none", "crop", "flip", "crop+flip")


class Augment:
    """Random crop with zero padding, then random horizontal flip, per image, batched.

    For each image, in this order of draws from ``generator``: a vertical offset and a horizontal
    offset in ``0..2 * crop_padding`` for all images, then (``flip``) a coin for all images.
    The image is padded with ``crop_padding`` zeros on every side and the ``H x W`` window at
    that offset is kept, mirrored left-right when the coin is 1. The same generator state gives
    the same output. Works on any device; the draws happen on ``generator``'s device (CPU when
    None: the global RNG).
    """

    def __init__(
        self, crop_padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
    ) -> None:
        self.crop_padding = check_int("crop_padding", crop_padding, 0)
        self.flip = bool(flip)
        self.generator = generator

    def __call__(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> augmented ``(N, C, H, W)`` of the same dtype and device."""
        if images.ndim != 4:
            raise ValueError(f"Augment expects (N, C, H, W) images, got {tuple(images.shape)}")
        p = self.crop_padding
        if p == 0 and not self.flip:
            return images
        n, c, h, w = images.shape
        device = images.device
        draw_device = self.generator.device if self.generator is not None else torch.device("cpu")

        def draw(high: int) -> Tensor:
            return torch.randint(high, (n,), generator=self.generator, device=draw_device).to(
                device
            )

        rows = torch.arange(h, device=device).expand(n, h)
        cols = torch.arange(w, device=device).expand(n, w)
        out = images
        if p > 0:
            rows = rows + draw(2 * p + 1)[:, None]
            cols = cols + draw(2 * p + 1)[:, None]
            out = F.pad(images, (p, p, p, p))
            # Gather the window rows, then columns: per-image offsets without a Python loop.
            out = out.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
        if self.flip:
            flipped = draw(2).bool()
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip})"
