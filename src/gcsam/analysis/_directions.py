"""The directions of :mod:`gcsam.landscape`: seeded Gaussian directions, filter-normalized as in
Li et al. (2018), or the caller's own, checked against the model's parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._util.validate import check_choice
from ._measure import like_params

NORMALIZATIONS = ("filter", "layer", "none")
IGNORE_1D = ("zero", "keep")
_EPS = 1e-10  # keeps an all-zero direction filter from dividing by zero (Li et al.'s constant)


def random_directions(
    model: nn.Module, *, seed: int, normalization: str = "filter", ignore_1d: str = "zero"
) -> list[Tensor]:
    """One random direction: a Gaussian tensor per parameter of ``model`` (same shapes, dtypes
    and devices, in ``model.parameters()`` order), drawn from a CPU ``torch.Generator`` seeded
    with ``seed``, so the same seed gives the same direction on any device.

    Args:
        normalization: ``"filter"`` scales each output filter (row ``d[i]`` of a tensor with
            ndim > 1) to the norm of the weights' filter ``w[i]``; ``"layer"`` scales each whole
            tensor to the weights' norm; ``"none"`` keeps the raw Gaussian.
        ignore_1d: ``"zero"`` (Li et al.'s default) leaves 1-D and 0-D tensors (biases,
            BatchNorm scales and shifts) unperturbed; ``"keep"`` perturbs them too, each scaled
            as one whole vector to the tensor's norm (unless ``normalization="none"``).
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("ignore_1d", ignore_1d, IGNORE_1D)
    generator = torch.Generator().manual_seed(int(seed))
    directions = []
    for param in model.parameters():
        weight = param.detach().to(torch.float64 if param.dtype == torch.float64 else torch.float32)
        # Drawn for every tensor, zeroed or not, so that a tensor's direction does not depend
        # on ignore_1d.
        direction = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
        direction = direction.to(weight.device)
        if weight.dim() <= 1 and ignore_1d == "zero":
            direction.zero_()
        elif normalization == "filter" and weight.dim() > 1:
            dims = tuple(range(1, weight.dim()))
            target = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
            direction.mul_(
                target / (torch.linalg.vector_norm(direction, dim=dims, keepdim=True) + _EPS)
            )
        elif normalization != "none":  # "layer", or a 1-D tensor kept under "filter"
            target = torch.linalg.vector_norm(weight)
            direction.mul_(target / (torch.linalg.vector_norm(direction) + _EPS))
        directions.append(direction.to(param.dtype))
    return directions


def resolve_directions(
    model: nn.Module,
    given: Sequence[Sequence[Tensor]] | None,
    names: tuple[str, ...],
    *,
    seed: int,
    normalization: str,
    ignore_1d: str,
) -> tuple[list[list[Tensor]], dict[str, Any]]:
    """One checked direction per name: ``given``, or the random directions of seeds ``seed``,
    ``seed + 1``, ...; and how they were chosen, for the settings."""
    named = list(model.named_parameters())
    if not named:
        raise ValueError("model has no parameters to perturb")
    if given is None:
        given = [
            random_directions(
                model, seed=seed + i, normalization=normalization, ignore_1d=ignore_1d
            )
            for i in range(len(names))
        ]
        source: dict[str, Any] = {"seed": seed, "normalization": normalization}
        source["ignore_1d"] = ignore_1d
    else:
        source = {"seed": None, "normalization": "given", "ignore_1d": None}
    checked = [like_params(d, named, name) for d, name in zip(given, names, strict=True)]
    return checked, source
