"""Gradient centralization (Yong et al., 2020).

For a weight gradient ``g`` of shape ``(C_out, *rest)``, GC subtracts from each output unit's
slice its mean over ``rest``::

    GC(g)[i] = g[i] - mean(g[i])

which is the projection ``P = I - e e^T / n`` applied per output unit: it never increases the
norm, is idempotent, and leaves 1-D tensors (biases, norm-layer scales) alone.

Complex gradients are supported: the complex row mean is subtracted, which is GC of the real and
the imaginary parts separately (``P`` is real), so a complex parameter behaves like its
``torch.view_as_real`` pair of real parameters, as in torch's own optimizers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .distributed import local

GC_SCOPES = ("all", "conv", "none")
# Dtypes that accumulate sums well enough as they are (complex64 is a pair of fp32).
WIDE_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """``None`` for a dtype in :data:`WIDE_DTYPES`, else its fp32 (or complex64) widening."""
    return None if dtype in WIDE_DTYPES else torch.promote_types(dtype, torch.float32)


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
    better so that fp16/bf16 gradients keep their precision; complex for a complex tensor."""
    dims = tuple(range(1, tensor.dim()))
    # An explicit dtype costs time on CPU even when it is the tensor's own: pass it only to widen.
    sums = tensor.sum(dim=dims, keepdim=True, dtype=accumulation_dtype(tensor.dtype))
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
    zero (the paper's rule, kept as is). A complex tensor loses its complex row mean: GC of its
    real and imaginary parts.
    """
    check_scope(scope)
    batch = [tensors] if isinstance(tensors, Tensor) else tensors
    for tensor in local(t for t in batch if t is not None):  # a DTensor: its local rows
        if not is_centralized(tensor, scope):
            continue
        if tensor.is_sparse:
            raise ValueError("centralize_gradient does not support sparse tensors; use dense ones")
        tensor.sub_(row_mean(tensor))
    return tensors
