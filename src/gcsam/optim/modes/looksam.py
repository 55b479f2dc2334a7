""":class:`LookSAM`: :class:`~gcsam.Periodic`, and the steps between reuse the sharpness part
``g_v`` of the last full step's descent gradient (Liu et al., CVPR 2022)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..._util.validate import check_number
from .. import _functional
from .._functional import _real_view, device_sums, squared_norms, total_norm
from ..centralization import accumulation_dtype
from ..distributed import Shards, local, place_like
from .base import Host, ModeState, entry_error, entry_item
from .periodic import Periodic

if TYPE_CHECKING:
    from .._functional import AscentGroup


@dataclass
class LookState(ModeState):
    """Attributes:
    directions: ``g_v`` per parameter (shaped like it), for the parameters that had a
        gradient at the last full step, in the order of the param groups.
    norm: ``||g_v||_2`` over all of them.
    valid: ``g_v`` comes from a full step that completed and moved the weights.
    """

    directions: dict[Tensor, Tensor] = field(default_factory=dict)
    norm: float = 0.0
    valid: bool = False


@dataclass(frozen=True)
class LookSAM(Periodic):
    """:class:`Periodic`, with the steps between reusing the last full step's ``g_v``."""

    alpha: float = 0.7
    State = LookState

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("LookSAM(alpha=...)", self.alpha, zero=True)

    def check_ddp(self, local_ascent: bool) -> None:
        if local_ascent:
            raise ValueError(
                "LookSAM under DDP needs ascent='global': its steps without ascent descend "
                "along the all-reduced gradient of the first pass (and its g_v must be the "
                "same on every worker)"
            )

    def before_ascent(self, host: Host, state: LookState, groups: list[AscentGroup]) -> None:
        """Copy ``g`` into the ``g_v`` buffers, where :meth:`correct_descent` turns it into
        ``g_v``."""
        state.valid = False
        state.directions = {
            p: _functional.buffer_like(state.directions.get(p), p)
            for group in groups
            for p in group.params
        }
        for group in groups:
            stores = [state.directions[p] for p in group.params]
            _functional.copy_(stores, group.grads, foreach=group.foreach)

    def correct_descent(self, host: Host, state: LookState, *, ascended: bool, moved: bool) -> None:
        """After a full step, ``g_v`` from the descent gradient ``g_s`` (none when the ascent
        moved no weight); after the others, ``g <- g + alpha ||g|| / ||g_v|| g_v``."""
        params = [p for p in state.directions if p.grad is not None]
        if not params:  # a closure without backward(): nothing to correct, as torch does nothing
            state.valid = state.valid and not ascended
            return
        grads = [p.grad for p in params]
        stores = [state.directions[p] for p in params]
        foreach = host._foreach_for(params)
        if ascended:
            norm = orthogonal_part_(stores, grads, foreach=foreach, shards=host._shards)
            # Unmoved (rho = 0, a zero gradient), g_s was taken at w: g_s = g and g_v = 0, and
            # the norm is rounding noise that add_sharpness_ would scale up to alpha ||g||.
            state.valid = moved and math.isfinite(norm) and len(params) == len(state.directions)
            state.norm = norm
        elif state.valid:
            add_sharpness_(
                grads, stores, alpha=self.alpha, norm=state.norm, foreach=foreach,
                shards=host._shards,
            )  # fmt: skip

    def save(self, host: Host, state: LookState) -> dict[str, Any]:
        """``g_v`` keyed by the parameter's index over all groups, like torch's own state."""
        params = [p for group in host.param_groups for p in group["params"]]
        return super().save(host, state) | {
            "look_norm": state.norm,
            "look_valid": state.valid,
            "look_direction": {
                index: state.directions[p]
                for index, p in enumerate(params)
                if p in state.directions
            },
        }

    def load(self, host: Host, entry: dict[str, Any]) -> LookState:
        """A ``g_v`` that is not ``valid`` is never used (the next full step replaces it), so
        only a valid one must be finite, with a finite norm."""
        state = super().load(host, entry)
        norm, valid = entry_item(entry, "look_norm"), entry_item(entry, "look_valid")
        if not isinstance(valid, bool):
            raise entry_error("look_valid", "True or False", valid)
        if isinstance(norm, bool) or not isinstance(norm, int | float):
            raise entry_error("look_norm", "a number", norm)
        if valid and not (math.isfinite(norm) and norm >= 0):
            raise entry_error("look_norm", "a finite number >= 0 (look_valid is True)", norm)
        state.norm, state.valid = float(norm), valid
        saved = entry_item(entry, "look_direction")
        state.directions = self._load_directions(host, saved, finite=valid)
        return state

    @staticmethod
    def _load_directions(host: Host, saved: Any, finite: bool) -> dict[Tensor, Tensor]:
        """Copies of the saved ``g_v``, on their parameters' device and dtype, checked (to be
        ``finite`` too, if asked)."""
        params = [p for group in host.param_groups for p in group["params"]]
        if not isinstance(saved, dict):
            raise entry_error("look_direction", "a dict: parameter index -> tensor", saved)
        for index in saved:
            if (
                isinstance(index, bool)
                or not isinstance(index, int)
                or not 0 <= index < len(params)
            ):
                raise entry_error(
                    "look_direction", f"keyed by parameter indices 0..{len(params) - 1}", index
                )
        directions = {}
        for index in sorted(saved):
            value, param = saved[index], params[index]
            if not isinstance(value, Tensor) or value.shape != param.shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else value
                raise entry_error(
                    f"look_direction[{index}]", f"a tensor of shape {tuple(param.shape)}", got
                )
            if finite and not bool(torch.isfinite(local([value])[0]).all()):
                raise entry_error(
                    f"look_direction[{index}]", "finite (look_valid is True)", "inf or NaN values"
                )
            directions[param] = place_like(param, value)  # a full tensor is sharded (FSDP2)
        return directions


# The math: the sharpness component g_v and its reuse ----------------------------------------

# The most elements one multi-tensor product with a device scalar makes at once (64 MiB of
# fp32), so that its temporaries stay far below a copy of the parameters.
_CHUNK_NUMEL = 1 << 24


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` (real part for complex tensors) as a 0-d tensor, in fp32 or wider."""
    a, b = _real_view(a).reshape(-1), _real_view(b).reshape(-1)
    dtype = accumulation_dtype(a.dtype) or a.dtype
    return torch.dot(a.to(dtype), b.to(dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that ``dtype``'s kernels compute in (fp32 for fp16/bf16)."""
    return torch.promote_types(dtype, torch.float32)


def _batches(tensors: list[Tensor], *others: list[Tensor]) -> Iterable[list[list[Tensor]]]:
    """``tensors`` and the lists paired with them, split by device and dtype, then into chunks of
    at most :data:`_CHUNK_NUMEL` elements (or one tensor): the temporaries of a product with a
    device scalar stay small."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        by_kind[(tensor.device, tensor.dtype)].append(index)
    for indices in by_kind.values():
        chunk: list[int] = []
        numel = 0
        for index in indices:
            if chunk and numel + tensors[index].numel() > _CHUNK_NUMEL:
                yield [[group[i] for i in chunk] for group in (tensors, *others)]
                chunk, numel = [], 0
            chunk.append(index)
            numel += tensors[index].numel()
        if chunk:
            yield [[group[i] for i in chunk] for group in (tensors, *others)]


def _add_scaled_on_device_(
    targets: list[Tensor], sources: list[Tensor], scale: Tensor, *, foreach: bool
) -> None:
    """``target += scale * source`` pairwise, with ``scale`` a 0-d tensor that stays on the
    device (no host-device sync). The product is taken in the sources' compute dtype, so that
    fp16/bf16 targets are rounded once, as by ``add_(source, alpha=scale)``."""
    if foreach:
        for batch_targets, batch_sources in _batches(targets, sources):
            dtype = _compute_dtype(batch_sources[0].dtype)
            factor = scale.to(dtype)
            if batch_sources[0].dtype == dtype:
                products = torch._foreach_mul(batch_sources, factor)
            else:
                products = [source.to(dtype) for source in batch_sources]
                torch._foreach_mul_(products, factor)
            torch._foreach_add_(batch_targets, products)
        return
    for target, source in zip(targets, sources, strict=True):
        dtype = _compute_dtype(source.dtype)
        target.add_(source.to(dtype) * scale.to(dtype))


def orthogonal_part_(
    store: list[Tensor], sharp: list[Tensor], *, foreach: bool, shards: Shards | None = None
) -> float:
    """``store <- g_v = g_s - (<g, g_s> / ||g||^2) g`` in place, where ``store`` holds ``g`` and
    ``sharp`` holds ``g_s``; returns ``||g_v||_2`` (non-finite if either input was). With
    ``shards``, the norms and the dot product are over every rank's shard."""
    store, sharp = local(store), local(sharp)
    g_squared, inner = device_sums(
        [
            squared_norms(store, foreach=foreach, precise=False),
            [_dot(g, s) for g, s in zip(store, sharp, strict=True)],
        ],
        shards,
    )
    # The coefficient stays on the device; g_squared is 0 only for a zero g.
    negated = torch.where(g_squared != 0, -inner / g_squared, torch.zeros_like(inner))
    if foreach:
        for batch_store, batch_sharp in _batches(store, sharp):
            torch._foreach_mul_(batch_store, negated.to(_compute_dtype(batch_store[0].dtype)))
            torch._foreach_add_(batch_store, batch_sharp)
    else:
        for g, s in zip(store, sharp, strict=True):
            g.mul_(negated.to(_compute_dtype(g.dtype))).add_(s)
    # The one read of this step's mode: whether g_v is finite decides, on the host, whether the
    # next k - 1 steps reuse it.
    return total_norm(squared_norms(store, foreach=foreach, precise=False), shards)


def add_sharpness_(
    grads: list[Tensor],
    directions: list[Tensor],
    *,
    alpha: float,
    norm: float,
    foreach: bool,
    shards: Shards | None = None,
) -> None:
    """``g <- g + alpha * (||g|| / norm) * g_v``, with ``norm = ||g_v||`` and the directions
    ``g_v``; nothing when ``norm`` is 0. ``||g||`` never leaves the device (over every rank's
    shard with ``shards``): LookSAM's steps between full ones read nothing back."""
    if not norm or not alpha:
        return
    grads, directions = local(grads), local(directions)
    (squared,) = device_sums([squared_norms(grads, foreach=foreach, precise=False)], shards)
    _add_scaled_on_device_(grads, directions, alpha * squared.sqrt() / norm, foreach=foreach)
