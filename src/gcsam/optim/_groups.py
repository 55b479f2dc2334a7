"""The SAM family's param groups: checks of their settings, of parameters listed once, and of
settings that suit the parameters' dtypes (each raises before anything changes, naming what is
wrong), and the groups shared with the base optimizer."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._util.validate import check_number
from .centralization import check_scope

NORMALIZERS = ("centralized", "raw")
SAM_SETTINGS = ("rho", "adaptive", "p", "normalize_by", "gc_scope", "gc_descent")
# Every floating dtype a weight may have holds a radius this large (fp16's largest value).
_RHO_HELD_BY_ALL = torch.finfo(torch.float16).max


def check_group(
    param_group: Mapping[str, Any],
    defaults: Mapping[str, Any],
    params: Sequence[Tensor],
    index: int,
) -> None:
    """Raise if a param group's settings (or the ``defaults`` it falls back to) are invalid, or
    do not suit ``params``, its parameters (group ``index``)."""

    def setting(key: str) -> Any:
        return param_group.get(key, defaults[key])

    check_number("rho", setting("rho"), zero=True)
    if setting("p") not in (2, math.inf):
        raise ValueError(f"p must be 2 or float('inf'), got {setting('p')!r}")
    if setting("normalize_by") not in NORMALIZERS:
        raise ValueError(
            "normalize_by must be 'centralized' (the paper: divide by ||GC(g)||) or 'raw' "
            f"(the authors' released script: divide by ||g||), got {setting('normalize_by')!r}"
        )
    check_scope(setting("gc_scope"), "gc_scope")
    for flag in ("adaptive", "gc_descent"):
        if not isinstance(setting(flag), bool):
            raise TypeError(f"{flag} must be True or False, got {setting(flag)!r}")
    _check_params_suit(setting("rho"), setting("p"), params, index)


def _describe(params: Sequence[Tensor], position: int, index: int) -> str:
    """Where a parameter is, for error messages."""
    param = params[position]
    return (
        f"parameter {position} of param group {index} ({param.dtype}, shape {tuple(param.shape)})"
    )


def _check_params_suit(rho: Any, p: Any, params: Sequence[Tensor], index: int) -> None:
    """Raise ``ValueError`` for a complex parameter with ``p = inf`` or a ``rho`` beyond what a
    parameter's dtype holds; a Python loop only in those rare settings."""
    if p == math.inf:
        for position, param in enumerate(params):
            if param.is_complex():
                raise ValueError(
                    f"{_describe(params, position, index)} is complex, and p=inf perturbs by "
                    "sign(d), which complex numbers lack; use p=2 for this group"
                )
    if rho > _RHO_HELD_BY_ALL:
        for position, param in enumerate(params):
            largest = torch.finfo(param.dtype).max
            if rho > largest:
                raise ValueError(
                    f"rho must be at most {largest:g}, the largest {param.dtype} value, since "
                    f"the perturbation reaches rho; {_describe(params, position, index)} "
                    f"would overflow, got {rho!r}"
                )


def check_unique(groups: Sequence[Sequence[Tensor]]) -> None:
    """Raise ``ValueError`` if a tensor appears twice in or across these groups' params."""
    seen: dict[int, tuple[int, int]] = {}
    for index, params in enumerate(groups):
        for position, param in enumerate(params):
            first = seen.setdefault(id(param), (index, position))
            if first != (index, position):
                raise ValueError(
                    f"{_describe(params, position, index)} is the same tensor as parameter "
                    f"{first[1]} of param group {first[0]}: a sharpness-aware step would perturb "
                    "it twice (||eps|| > rho). List each parameter once (model.parameters() "
                    "already does, tied weights included)"
                )


def check_one_device(groups: Sequence[Sequence[Tensor]]) -> None:
    """Raise ``ValueError`` if these groups' params are on more than one device: the ascent's
    one norm, and its scale, are computed and kept on the parameters' device."""
    first: tuple[int, int, torch.device] | None = None
    for index, params in enumerate(groups):
        for position, param in enumerate(params):
            if first is None:
                first = (index, position, param.device)
            elif param.device != first[2]:
                raise ValueError(
                    f"parameters on several devices in one optimizer: "
                    f"{_describe(params, position, index)} is on {param.device}, parameter "
                    f"{first[1]} of param group {first[0]} on {first[2]}; move the model to one "
                    "device first (model.to(device)), or build one optimizer per device"
                )


def check_no_shared_keys(base: Optimizer) -> None:
    shared = sorted(set(SAM_SETTINGS) & set(base.defaults))
    if shared:
        raise ValueError(
            f"{type(base).__name__} keeps its own {', '.join(map(repr, shared))} in its param "
            "groups, which the SAM wrapper shares and would overwrite; wrap a different base "
            "optimizer"
        )


def check_same_params(params: Iterable[Any], base: Optimizer) -> None:
    given: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            group_params = item["params"]
            given += [group_params] if isinstance(group_params, Tensor) else list(group_params)
        else:
            given.append(item)
    expected = [p for group in base.param_groups for p in group["params"]]
    if {id(p) for p in given} != {id(p) for p in expected} or len(given) != len(expected):
        raise ValueError(
            f"params ({len(given)} tensors) do not match the {len(expected)} parameters of the "
            "base_optimizer instance; pass params=None or exactly the instance's parameters"
        )


def build_base(
    base_class: type[Optimizer],
    groups: list[dict[str, Any]],
    base_kwargs: dict[str, Any],
    foreach: bool | None,
) -> Optimizer:
    """``base_class`` built on the wrapper's own param groups (one list for both)."""
    if foreach is not None and "foreach" in inspect.signature(base_class).parameters:
        base_kwargs.setdefault("foreach", foreach)  # one switch for both steps
    base = base_class(groups, **base_kwargs)
    check_no_shared_keys(base)
    return base


def adopt_groups(
    params: Iterable[Any] | None,
    base: Optimizer,
    defaults: dict[str, Any],
    base_kwargs: dict[str, Any],
) -> list[dict[str, Any]]:
    """The param groups of an optimizer instance, checked, with the wrapper's settings written
    into them (they win over any a previous wrapper left there)."""
    if not isinstance(base, Optimizer):
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
            f"or an optimizer instance, got {base!r}"
        )
    if base_kwargs:
        raise TypeError(
            f"base optimizer arguments ({', '.join(sorted(base_kwargs))}) can only be "
            "given when base_optimizer is a class; set them on the instance instead"
        )
    if params is not None:
        check_same_params(params, base)
    check_no_shared_keys(base)
    groups = base.param_groups
    check_unique([group["params"] for group in groups])  # torch only warned
    check_one_device([group["params"] for group in groups])
    for index, group in enumerate(groups):  # before the update below changes the instance
        check_group(defaults, defaults, group["params"], index)
    for group in groups:
        group.update(defaults)
    return groups


def prepare_group(
    param_group: dict[str, Any],
    groups: list[dict[str, Any]],
    check: Callable[[dict[str, Any], Sequence[Tensor], int], None],
) -> None:
    """A param group about to join ``groups``, its params made a list and checked: none
    listed already, and settings that ``check`` accepts. A set is left for torch to refuse
    (it has no order)."""
    params = param_group["params"]
    if isinstance(params, set):
        return
    params = param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
    check_unique([*(group["params"] for group in groups), params])
    check_one_device([*(group["params"] for group in groups), params])
    check(param_group, params, len(groups))
