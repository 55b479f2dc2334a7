"""Gradient centralization (Yong et al., 2020).

For a weight gradient ``g`` of shape ``(C_out, *rest)``, GC subtracts from each output unit's
slice its mean over ``rest``::

    GC(g)[i] = g[i] - mean(g[i])

which is the projection ``P = I - e e^T / n`` applied per output unit: it never increases the
norm, is idempotent, and leaves 1-D tensors (biases, norm-layer scales) alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

GC_SCOPES = ("all", "conv", "none")


def check_scope(scope: str, name: str = "scope") -> None:
    if scope not in GC_SCOPES:
        raise ValueError(
            f"{name} must be one of {', '.join(repr(s) for s in GC_SCOPES)} "
            f"('all': every tensor with ndim > 1, as in the paper; 'conv': ndim > 3 only; "
            f"'none': no centralization), got {scope!r}"
        )


def is_centralized(tensor: Tensor, scope: str) -> bool:
    """Whether GC with ``scope`` touches a tensor of this shape."""
    if tensor.numel() == 0:
        return False
    if scope == "all":
        return tensor.dim() > 1
    if scope == "conv":
        return tensor.dim() > 3
    return False


def row_mean(tensor: Tensor) -> Tensor:
    """Mean over every dim but the first, shape ``(C_out, 1, ..., 1)``, accumulated in fp32 or
    better so that fp16/bf16 gradients keep their precision."""
    dims = tuple(range(1, tensor.dim()))
    # An explicit dtype costs time on CPU even when it is the tensor's own: pass it only to widen.
    wide = tensor.dtype in (torch.float32, torch.float64)
    sums = tensor.sum(dim=dims, keepdim=True, dtype=None if wide else torch.float32)
    # sum + divide is measurably faster than mean(dim=...) on CPU, with the same result.
    return sums.div_(tensor.numel() // tensor.shape[0])


def centralize_gradient(
    tensors: Tensor | Iterable[Tensor | None], scope: str = "all"
) -> Tensor | Iterable[Tensor | None]:
    """Centralize gradients in place and return the argument.

    Args:
        tensors: a tensor or an iterable of tensors (``None`` entries, as in
            ``[p.grad for p in params]``, are skipped).
        scope: ``"all"`` centralizes every tensor with ``ndim > 1`` (the paper),
            ``"conv"`` only tensors with ``ndim > 3`` (convolution kernels), ``"none"`` nothing.

    A weight of shape ``(C_out, 1)`` has one element per row, so its centralized gradient is
    zero (the paper's rule, kept as is).
    """
    check_scope(scope)
    batch = [tensors] if isinstance(tensors, Tensor) else tensors
    for tensor in batch:
        if tensor is None or not is_centralized(tensor, scope):
            continue
        if tensor.is_sparse:
            raise ValueError("centralize_gradient does not support sparse tensors; use dense ones")
        tensor.sub_(row_mean(tensor))
    return tensors
