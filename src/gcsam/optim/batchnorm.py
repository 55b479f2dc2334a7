"""Keep the second (descent) forward pass of a SAM step from moving BatchNorm statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parameter import is_lazy

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# What a lazy norm layer's statistics hold when its first forward materializes them.
_INITIAL = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}


@contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Context manager: every norm layer that tracks running statistics (BatchNorm, SyncBatchNorm,
    InstanceNorm with ``track_running_stats=True``, their lazy forms) ends the block with the
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` it started with, bit for bit,
    even if the block raises.

    Layers still normalize with batch statistics in training mode; only the update is undone.
    Unlike setting ``momentum = 0``, this also covers ``momentum=None`` (cumulative average)
    layers and ``num_batches_tracked``.

    ``enabled=False`` makes it a no-op, e.g. ``frozen_bn_stats(model, enabled=opt.descending)``
    inside a closure that runs for both passes (``descending``, not ``perturbed``: a step that
    moved no weight, as at ``rho=0``, must not update the statistics twice either).
    """
    saved: list[tuple[nn.Module, str, torch.Tensor | None]] = []
    if enabled:
        for module in model.modules():
            if not getattr(module, "track_running_stats", False):
                continue
            for name in _STAT_BUFFERS:
                buffer = getattr(module, name, None)
                if isinstance(buffer, torch.Tensor):
                    saved.append((module, name, None if is_lazy(buffer) else buffer.clone()))
    try:
        yield
    finally:
        for module, name, value in saved:
            buffer = getattr(module, name)
            if is_lazy(buffer):
                continue
            # Write through .data: BatchNorm saves the running buffers for backward, and a
            # backward after the block would otherwise fail autograd's version check. Train-mode
            # backward never reads them, and in eval mode they were not changed.
            if value is None:
                buffer.data.fill_(_INITIAL[name])
            else:
                buffer.data.copy_(value)
