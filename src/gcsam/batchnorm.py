"""Keep the second (perturbed) forward pass of a SAM step from moving BatchNorm statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Context manager: every norm layer that tracks running statistics (BatchNorm, SyncBatchNorm,
    InstanceNorm with ``track_running_stats=True``) ends the block with the ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` it started with, bit for bit, even if the block
    raises.

    Layers still normalize with batch statistics in training mode; only the update is undone.
    Unlike setting ``momentum = 0``, this also covers ``momentum=None`` (cumulative average)
    layers and ``num_batches_tracked``.

    ``enabled=False`` makes it a no-op, e.g. ``frozen_bn_stats(model, enabled=opt.perturbed)``
    inside a closure that runs for both passes.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if enabled:
        for module in model.modules():
            if not getattr(module, "track_running_stats", False):
                continue
            for name in _STAT_BUFFERS:
                buffer = getattr(module, name, None)
                if isinstance(buffer, torch.Tensor):
                    saved.append((buffer, buffer.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
