r"""Weight averaging for any optimizer, the SAM family included: an EMA of the weights or SWA,
on :mod:`torch.optim.swa_utils` (:class:`~torch.optim.swa_utils.AveragedModel`,
:func:`~torch.optim.swa_utils.update_bn`).

``average="ema"`` (Polyak averaging; timm's ``ModelEmaV2``)
    After every optimizer step, :math:`\bar w \leftarrow d\,\bar w + (1 - d)\,w` with
    ``ema_decay`` :math:`d`, over the parameters and the buffers (BatchNorm statistics too), so
    :math:`\bar w` is evaluated as it is. Its horizon is about :math:`1 / (1 - d)` steps.
``average="swa"`` (Izmailov et al., UAI 2018)
    At the end of every epoch :math:`e > \lfloor s E \rfloor` (``swa_start`` :math:`s` of the
    :math:`E` epochs), :math:`\bar w` becomes the running mean of the weights at those epochs'
    ends. The run's own LR schedule is kept (``--schedule none`` is the paper's constant-LR
    SWA). A model with BatchNorm gets fresh statistics for :math:`\bar w` before each
    evaluation: one forward pass over the training split, without augmentation, timed with
    the epoch (it is not a training pass, so not in ``passes_per_step``).

The averaged weights are what the run validates, selects (``best.pt``), tests and saves
(``final.pt``, in the plain model's keys); training goes on from the live weights, which
``last.pt`` keeps with the average, so a resumed run continues bit for bit. One extra copy of
the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

AVERAGES: tuple[str, ...] = ("none", "ema", "swa")
"""The weight averages a run can evaluate: none, an EMA of every step, SWA of the last epochs."""


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class WeightAverage:
    """The averaged copy of ``model`` that a run evaluates (see the module docstring).

    Args:
        kind: ``"ema"`` or ``"swa"``.
        model: the live model (not a DDP wrapper); the average is a deep copy of it.
        decay: the EMA's ``d`` in (0, 1).
        start: SWA averages the epochs after ``floor(start * epochs)``; ``start`` in [0, 1).
        epochs: the run's epochs.
    """

    def __init__(self, kind: str, model: nn.Module, *, decay: float, start: float, epochs: int):
        if kind not in ("ema", "swa"):
            raise ValueError(f"kind must be ema or swa, got {kind!r}")
        self.kind = kind
        self.first_epoch = math.floor(start * epochs) + 1  # SWA's first averaged epoch
        if kind == "ema":
            self.averaged = AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
            )
        else:
            self.averaged = AveragedModel(model)  # buffers follow the model; update_bn resets them
        self.refresh_bn = kind == "swa" and _has_batch_norm(model)

    @property
    def started(self) -> bool:
        """Whether the average holds any weights yet (before then, the live model is used)."""
        return int(self.averaged.n_averaged) > 0

    def after_step(self, model: nn.Module) -> None:
        """Fold the weights after an optimizer step in (EMA only)."""
        if self.kind == "ema":
            self.averaged.update_parameters(model)

    def after_epoch(
        self,
        epoch: int,
        model: nn.Module,
        training_inputs: Callable[[], Iterable[Tensor]],
        share: Callable[[Tensor], None] | None = None,
    ) -> None:
        """Fold the weights at the end of epoch ``epoch`` (1-based) in (SWA, from its first
        averaged epoch), and give a BatchNorm model statistics for the average from
        ``training_inputs()`` (model inputs, ready for the forward). Under torchrun ``share``
        broadcasts a tensor from rank 0, so that every worker evaluates the same average."""
        if self.kind != "swa" or epoch < self.first_epoch:
            return
        self.averaged.update_parameters(model)
        if self.refresh_bn:
            update_bn(training_inputs(), self.averaged)
            if share is not None:
                for buffer in self.averaged.module.buffers():
                    share(buffer)

    def module(self, model: nn.Module) -> nn.Module:
        """What the run evaluates now: the average once it has started, else ``model``."""
        return self.averaged.module if self.started else model

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def build_average(cfg: Any, model: nn.Module) -> WeightAverage | None:
    """The average a resolved config asks for (``average``, ``ema_decay``, ``swa_start``,
    ``epochs``), or None."""
    if cfg.average == "none":
        return None
    return WeightAverage(
        cfg.average, model, decay=cfg.ema_decay, start=cfg.swa_start, epochs=cfg.epochs
    )
