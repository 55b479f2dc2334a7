r"""GCSAM under ``DistributedDataParallel`` (DDP): which gradient the ascent uses.

Give the optimizer the DDP-wrapped model and it decides, per pass, whether DDP all-reduces::

    ddp = DistributedDataParallel(model)
    opt = GCSAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=ddp, ascent="local")

With :math:`N` workers, worker :math:`i` holding the batch :math:`B_i` and loss :math:`L_i`:

``ascent="local"`` (default)
    Each worker perturbs with its **own** centralized gradient,
    :math:`\epsilon_i = \rho\,\mathrm{GC}(\nabla L_i(w)) / \lVert\mathrm{GC}(\nabla L_i(w))\rVert`,
    and the base optimizer steps with :math:`\frac1N \sum_i \nabla L_i(w + \epsilon_i)`. This is
    *m-sharpness* with :math:`m = |B_i|`, what the original SAM implementation did across
    accelerators (Foret et al., 2021, who found a smaller :math:`m` generalizes better). The
    ascent pass runs under ``no_sync()``: one gradient all-reduce per step, like plain DDP
    training. Results depend on the per-worker batch size, hence on the number of workers at a
    fixed global batch. Between ``first_step`` and ``second_step`` the workers' weights differ
    (each sits at its own :math:`w + \epsilon_i`); they are identical again afterwards.
``ascent="global"``
    The ascent gradient is all-reduced (a normal DDP backward) before centralization and
    normalization, so every worker perturbs identically with
    :math:`\epsilon = \rho\,\mathrm{GC}(\bar g) / \lVert\mathrm{GC}(\bar g)\rVert`,
    :math:`\bar g = \frac1N \sum_i \nabla L_i(w)`: the same step as one process on the whole
    global batch (for a mean loss over equal per-worker batches; BatchNorm statistics stay
    per worker). Two gradient all-reduces per step.

The descent gradient is all-reduced exactly once per step in both modes. The settings do
nothing when ``model`` is not a DDP module (or is ``None``), so the same code runs in one process.

Passes and micro-batches. DDP decides whether a backward all-reduces when the *forward* runs, so
each context below must hold the forward **and** the backward of its pass:

* closure style: ``opt.step(closure)`` runs the first closure call under ``no_sync()`` in local
  mode; nothing else to write.
* two-step style::

      with opt.ascent_pass():          # no_sync() in local mode, nothing in global mode
          loss_fn(ddp(x), y).backward()
      opt.first_step(zero_grad=True)
      loss_fn(ddp(x), y).backward()    # the descent pass: all-reduced
      opt.second_step(zero_grad=True)

* gradient accumulation, in either style and either pass (the optimizer knows which pass it is
  in: the descent pass runs from ``first_step`` to ``second_step``/``restore``)::

      for i, (xb, yb) in enumerate(micro):
          with opt.micro_batch(last=i == len(micro) - 1):
              (loss_fn(ddp(xb), yb) / len(micro)).backward()

  Every micro-batch but the last runs under ``no_sync()`` (the last one all-reduces the
  accumulated gradient); in local mode every micro-batch of the ascent pass does. No extra
  all-reduce per micro-batch.

Cheap modes (:mod:`gcsam.modes`). Every worker counts the same steps, so they agree on which
steps ascend. A :class:`~gcsam.Periodic` step without ascent has one pass, all-reduced in both
modes (``ascent_pass()`` and ``micro_batch()`` know which steps those are);
:class:`~gcsam.MomentumAscent`'s one pass is all-reduced too, and its perturbation comes from the
momentum, identical on every worker. :class:`~gcsam.LookSAM` and :class:`~gcsam.AdaptiveAscent`
need ``ascent="global"``: their steps without ascent descend along the first pass's gradient,
which must be all-reduced, and LookSAM's stored direction must be the same on every worker.

Non-finite ascent gradients. One process skips the whole step; a DDP worker cannot skip the
descent pass alone (the others would wait for it in the all-reduce), and in local mode the
workers may disagree. So in local mode each worker's "my ascent gradient is not finite" flag is
summed over the workers by one 4-byte all-reduce, started in ``first_step`` without waiting and
read in ``second_step`` (it overlaps the descent pass). Every worker runs the descent pass; if
any flag is set, every worker skips the base step (with a ``RuntimeWarning``, or with a
``GradScaler``: every worker's scaler records the overflow, so their scales stay equal). In
global mode the ascent gradients are identical on every worker and they agree without it.

GradScaler: the same recipe as in one process (``scaler.scale(loss).backward()`` in both
passes, ``step(closure, scaler)`` or ``first_step``/``second_step(scaler=scaler)``, then
``scaler.update()``). BatchNorm: batch statistics stay per worker (``SyncBatchNorm`` makes them
global); with ``broadcast_buffers=True`` DDP copies rank 0's running statistics to every worker
before each forward that follows an all-reducing one, so at the start of every step in either
mode; ``frozen_bn_stats`` works unchanged.

FSDP2 (``torch.distributed.fsdp.fully_shard``). The parameters are DTensors sharded along dim 0,
so each rank holds whole output rows: GC's row means are local, and so are the backup (one
extra local shard per rank), the perturbation and the restore, all on the local shards with the
multi-tensor kernels. The only quantities across ranks are the norms (and LookSAM's dot
product): each is one all-reduce of the local squared terms, in fp32 or fp64 as in one process,
over the ranks that shard the parameters (the shard dimension of an HSDP mesh; its replicas hold
the same values). FSDP2 reduce-scatters the gradients in every backward, so the ascent is
**global**: every rank perturbs along its rows of ``GC(g_mean)``, the step of one process on the
whole batch; ``ascent`` and ``model`` play no part. A non-finite gradient anywhere makes the
reduced norm non-finite on every rank, so every rank skips the step. Placements other than
``Shard(0)`` and ``Replicate()`` (a parameter sharded along another dim), and DTensor parameters
beside plain ones or on different meshes, raise ``ValueError`` before any weight changes.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

ASCENT_MODES = ("local", "global")


def check_ascent(ascent: object) -> str:
    """``ascent`` itself if valid; raise ``ValueError`` naming it otherwise."""
    if not isinstance(ascent, str) or ascent not in ASCENT_MODES:
        raise ValueError(
            "ascent must be 'local' (each DDP worker perturbs with its own gradient) or "
            f"'global' (with the all-reduced gradient), got {ascent!r}"
        )
    return ascent


def ddp_of(model: object) -> DistributedDataParallel | None:
    """The DDP module if ``model`` is one, ``None`` for another ``nn.Module`` or ``None``."""
    if model is None:
        return None
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module (the DistributedDataParallel model) or None, got {model!r}"
        )
    return model if isinstance(model, DistributedDataParallel) else None


def sync(ddp: DistributedDataParallel | None, enabled: bool) -> AbstractContextManager[None]:
    """``ddp.no_sync()`` unless ``enabled`` (or there is no DDP module)."""
    if ddp is None or enabled:
        return nullcontext()
    return ddp.no_sync()


def world_size(ddp: DistributedDataParallel) -> int:
    return torch.distributed.get_world_size(ddp.process_group)


class NonFiniteVote:
    """Sums every worker's "my ascent gradient is not finite" flag without blocking.

    Every worker of ``ddp``'s process group must create one at the same point (collectives
    match by order); :meth:`settle` waits for the sum.
    """

    def __init__(self, ddp: DistributedDataParallel, nonfinite: bool, device: torch.device):
        # On the parameters' device: NCCL only reduces CUDA tensors.
        self._flag: Tensor = torch.tensor([float(nonfinite)], device=device)
        # Looked up at call time so that benchmarks can count it.
        self._work = torch.distributed.all_reduce(
            self._flag, group=ddp.process_group, async_op=True
        )

        self._world_size = world_size(ddp)

    def settle(self, optimizer: Optimizer, scaler: torch.amp.GradScaler | None) -> bool:
        """Whether any worker's ascent gradient was not finite (waits for the sum). If so, this
        worker's ``scaler`` records an overflow for ``optimizer`` (or a warning is issued), so
        that every worker handles the skip the same way."""
        self._work.wait()
        workers = int(self._flag.item())
        if not workers:
            return False
        if scaler is not None and scaler.is_enabled():
            # The workers whose own ascent gradient was finite recorded no overflow: record one,
            # or their scales would part from the others' at update(). GradScaler has no public
            # way to; _found_inf_per_device is the hook optimizers that unscale themselves use.
            for found_inf in scaler._found_inf_per_device(optimizer).values():
                found_inf.fill_(1.0)
        else:
            warnings.warn(
                f"{type(optimizer).__name__}: the ascent gradient is not finite (inf/NaN) on "
                f"{workers} of {self._world_size} DDP workers; this step is skipped on every "
                "worker and the weights are unchanged",
                RuntimeWarning,
                stacklevel=4,  # the caller of second_step
            )
        return True


# FSDP2: DTensor parameters ------------------------------------------------------------------


def _dtensor_type() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` is loaded: a program with DTensors has loaded
    it, and importing it here would add most of a second to ``import gcsam``."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Each tensor, or its local shard if it is a DTensor (the same memory: in-place ops on it
    change the DTensor)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def place_like(param: Tensor, value: Tensor) -> Tensor:
    """A copy of ``value`` with ``param``'s dtype and device; for a DTensor ``param`` and a
    full (plain) ``value``, sharded like ``param`` (every rank calls, with the same value)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor) and not isinstance(value, dtensor):
        from torch.distributed.tensor import distribute_tensor

        full = value.to(device=param.device, dtype=param.dtype)
        return distribute_tensor(full, param.device_mesh, param.placements)
    return torch.empty_like(param, memory_format=torch.preserve_format).copy_(value)


@dataclass(frozen=True)
class Shards:
    """Where DTensor parameters live: the process group that shards them along dim 0 (the one
    every norm is all-reduced over) and the device of its collectives."""

    group: torch.distributed.ProcessGroup
    device: torch.device


def shards_of(params: list[Tensor], model: nn.Module | None = None) -> Shards | None:
    """The :class:`Shards` of ``params`` if they are DTensors, ``None`` for plain tensors (or
    DTensors replicated everywhere). ``ValueError`` naming the parameter (by its name in
    ``model`` if given, else by position and shape) for a placement GC cannot handle locally, or
    for a mix of DTensor and plain parameters or of meshes."""

    def name(index: int, param: Tensor) -> str:
        if model is not None:
            for found, candidate in model.named_parameters():
                if candidate is param:
                    return repr(found)
        return f"parameter {index} (shape {tuple(param.shape)})"

    dtensor = _dtensor_type()
    if dtensor is None:
        return None
    first: tuple[int, Tensor] | None = None
    plain: tuple[int, Tensor] | None = None
    for index, param in enumerate(params):
        if not isinstance(param, dtensor):
            plain = plain or (index, param)
            continue
        if any(not (p.is_replicate() or p.is_shard(0)) for p in param.placements) or (
            sum(p.is_shard() for p in param.placements) > 1
        ):
            raise ValueError(
                f"{name(index, param)} is a DTensor placed {param.placements}: gradient "
                "centralization needs whole rows on each rank, so only Shard(0) (FSDP2's "
                "fully_shard) and Replicate() are supported; shard it along dim 0"
            )
        if first is None:
            first = (index, param)
        elif (param.device_mesh, param.placements) != (first[1].device_mesh, first[1].placements):
            raise ValueError(
                f"{name(index, param)} is placed {param.placements} on {param.device_mesh} and "
                f"{name(*first)} {first[1].placements} on {first[1].device_mesh}: one "
                "optimizer's DTensor parameters must share one mesh and placement (one "
                "fully_shard setup); build one optimizer per mesh"
            )
    if first is None:
        return None
    if plain is not None:
        raise ValueError(
            f"{name(*plain)} is a plain tensor and {name(*first)} a DTensor: their norms cannot "
            "be combined (a plain tensor is replicated on every rank); fully_shard the module "
            "that holds it too, or optimize it separately"
        )
    param = first[1]
    shard_dims = [d for d, p in enumerate(param.placements) if p.is_shard()]
    if not shard_dims:  # replicated everywhere: every rank holds every value
        return None
    mesh = param.device_mesh
    return Shards(mesh.get_group(shard_dims[0]), torch.device(mesh.device_type))


class Placement:
    """Where an optimizer's parameters live, found by :func:`shards_of` and kept while they
    stay the same tensors (the check walks every parameter's placement)."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] | None = None
        self._shards: Shards | None = None

    def shards(
        self, params: list[Tensor], model: nn.Module | None, ddp: nn.Module | None
    ) -> Shards | None:
        """:func:`shards_of` these parameters; ``ValueError`` for DTensors under DDP."""
        key = tuple(map(id, params))
        if key != self._key:
            shards = shards_of(params, model)
            if shards is not None and ddp is not None:
                raise ValueError(
                    "model= is a DistributedDataParallel module over DTensor (FSDP2) "
                    "parameters: FSDP2 reduces the gradients itself and the ascent is global; "
                    "give the fully_shard model (or nothing) as model="
                )
            self._key, self._shards = key, shards
        return self._shards
