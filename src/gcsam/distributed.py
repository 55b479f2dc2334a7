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
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

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
