"""What every measurement of a trained model shares (:mod:`gcsam.sharpness`,
:mod:`gcsam.landscape`): the batches, the parameters measured, and leaving the caller's model
exactly as it was, either by working on a copy or by restoring everything touched."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..optim.batchnorm import frozen_bn_stats

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]
Batch = tuple[Tensor, Tensor, int]
"""``(inputs, targets, size)`` on the measuring device; ``size`` weights the batch's mean loss."""


def prepare_batches(batches: Batches, device: torch.device) -> list[Batch]:
    """The batches read once, on ``device``, with their sizes (the length of the targets, or of
    the inputs for 0-d targets); empty batches are left out (no mean loss, no weight)."""
    listed = list(batches)
    if not listed:
        raise ValueError("batches: no batches given (the iterable is empty)")
    data = []
    for i, batch in enumerate(listed):
        if (
            not isinstance(batch, tuple | list)
            or len(batch) != 2
            or not all(isinstance(t, Tensor) for t in batch)
        ):
            raise ValueError(f"batches: item {i} is not an (inputs, targets) pair of tensors")
        inputs, targets = batch
        size = int(targets.shape[0]) if targets.dim() > 0 else int(inputs.shape[0])
        if size > 0:
            data.append((inputs.to(device), targets.to(device), size))
    if not data:
        raise ValueError("batches: no examples (every batch is empty)")
    return data


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU for a stateless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def resolve_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    """The parameters to measure: ``params`` (all of them the model's, each once) or every
    parameter of the model with ``requires_grad=True``."""
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen = list(params)
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for p in chosen):
            raise ValueError("params: every tensor must be a parameter of model")
        if len({id(p) for p in chosen}) != len(chosen):
            raise ValueError("params: a parameter is listed twice")
    if not chosen:
        raise ValueError("params: no parameters to measure (none requires grad); pass params=...")
    if not all(p.is_floating_point() for p in chosen):
        raise ValueError("params: every parameter must be a floating-point tensor")
    return chosen


@contextmanager
def measuring(model: nn.Module, params: list[Tensor], train_mode: bool) -> Iterator[None]:
    """The model in place, in the measuring state (eval unless ``train_mode``, ``params``
    requiring grad, grad enabled); every flag, ``.grad`` and BN statistic is given back after.

    The weights themselves are the caller's to restore: only they know what they changed.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    # Measures use torch.autograd.grad, which never accumulates into .grad; keeping the
    # tensors themselves also undoes anything a hook or loss_fn might attach.
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        with frozen_bn_stats(model), torch.enable_grad():
            model.train(train_mode)
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for module, training in modes:
            module.training = training  # the flag itself: train() may be overridden to recurse
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        for p, grad in grads:
            p.grad = grad


def like_params(
    tensors: Iterable[Tensor], named: list[tuple[str, Tensor]], arg: str
) -> list[Tensor]:
    """``tensors``, one per ``(name, parameter)`` of ``named`` and shaped like it, detached on
    its device and dtype; a ValueError naming ``arg`` for a wrong count, type or shape or a
    non-finite value."""
    tensors = list(tensors)
    if len(tensors) != len(named):
        raise ValueError(f"{arg} has {len(tensors)} tensors for {len(named)} parameters")
    checked = []
    for i, (tensor, (name, param)) in enumerate(zip(tensors, named, strict=True)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{arg}[{i}] is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != param.shape:
            raise ValueError(
                f"{arg}[{i}] has shape {tuple(tensor.shape)}, parameter {name!r} has shape "
                f"{tuple(param.shape)}"
            )
        tensor = tensor.detach().to(device=param.device, dtype=param.dtype)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{arg}[{i}] (parameter {name!r}) has non-finite values")
        checked.append(tensor)
    return checked


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose parameters need no gradient, to perturb freely."""
    work = copy.deepcopy(model).eval()
    for param in work.parameters():
        param.requires_grad_(False)
    return work
