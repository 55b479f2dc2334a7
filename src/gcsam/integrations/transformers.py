"""GCSAM under the Hugging Face ``Trainer``: ``TrainingArguments`` stay the interface.

::

    from transformers import TrainingArguments
    from gcsam.integrations.transformers import SharpnessAwareArguments, SharpnessAwareTrainer

    trainer = SharpnessAwareTrainer(
        model=model,
        args=TrainingArguments("out", per_device_train_batch_size=32, learning_rate=1e-3),
        train_dataset=dataset,
        sharpness_aware=SharpnessAwareArguments(rho=0.05),  # GCSAM by default
    )
    trainer.train()

How it fits in the ``Trainer``'s loop. The loop fetches an accumulation window of micro-batches
and calls ``training_step`` on each; after the last one it clips the gradients, steps
``trainer.optimizer`` through accelerate (``GradScaler`` under fp16), steps the LR scheduler and
counts ``global_step``. :class:`SharpnessAwareTrainer` keeps the window's micro-batches and, at
the last one, takes the sharpness-aware part of the step over all of them: the first pass (HF's
own ``training_step``: loss, scaling for accumulation, ``accelerator.backward``), the ascent
``w -> w + eps``, the second pass at ``w + eps`` (BatchNorm statistics frozen), then back to
``w`` exactly with the descent gradient in ``.grad``. The loop then clips that gradient and
steps the base optimizer as it would without GCSAM. So every weight change happens in the loop's
own optimizer step, and:

* ``trainer.optimizer`` is the *base* optimizer, built by HF from ``TrainingArguments``
  (``optim``, ``learning_rate``, ``weight_decay`` groups, ``adam_*``) or given as
  ``optimizers=(optimizer, scheduler)``; ``trainer.sharpness_aware_optimizer`` wraps it and shares
  its ``param_groups``, so HF's LR scheduler moves the learning rate the descent step uses. A
  :class:`~gcsam.SharpnessAwareOptimizer` given as ``optimizers=(opt, scheduler)`` is used as
  is (then pass no ``sharpness_aware``), and HF steps its ``base_optimizer``.
* ``gradient_accumulation_steps``: both passes run over the whole window, so a step with
  ``k`` micro-batches of ``b`` samples is the step on one batch of ``k * b`` (mean loss; a
  shorter last window of an epoch too). The micro-batches are the loop's own prefetched ones.
* logging: ``loss`` is the first-pass loss (the loss at ``w``), exactly what the plain
  ``Trainer`` logs: ``training_step`` returns zero for a window's other micro-batches and the
  window's summed loss for its last one. ``grad_norm`` is the norm of the descent gradient before
  clipping (``max_grad_norm``, which clips the descent gradient).
* ``fp16``: both passes are scaled by accelerate's ``GradScaler``; the ascent gradient is
  unscaled before use. An overflow in either pass skips the step like any fp16 overflow: weights
  and base-optimizer state unchanged, the scale lowered, and the LR scheduler not stepped (for
  an unfused base: accelerate cannot tell a fused optimizer's skip, with or without GCSAM). On
  the CPU accelerate neither autocasts nor scales fp16 (the run would silently be fp32):
  refused. ``bf16``: both passes run under accelerate's autocast. Without a scaler, a
  non-finite ascent gradient skips the step with GCSAM's ``RuntimeWarning`` (its gradients are
  cleared, so the base step HF takes changes nothing; the LR scheduler steps, as HF's always
  does then).
* DDP (``torchrun``): the optimizer is given the DDP model at each step, so
  :attr:`SharpnessAwareArguments.ascent` holds: ``"local"``, one gradient all-reduce per
  optimizer step, ``"global"`` two (the step of one process on the global batch).
  :mod:`gcsam.optim.distributed` explains the difference. DeepSpeed and FSDP are refused, and so is
  a multi-process run whose model reaches ``training_step`` as something other than the DDP
  module (``torch_compile=True`` wraps it), since ``ascent`` could not act on it.
* checkpoints: HF saves and restores the base optimizer's state; the cheap modes' state (step
  count, LookSAM's direction, AdaptiveAscent's statistics) goes to ``sharpness_aware.pt`` in the
  same checkpoint folder, so ``trainer.train(resume_from_checkpoint=...)`` continues bit for bit.
  A resumed run keeps the checkpoint's sharpness-aware settings (they live in the optimizer's
  param groups, like the learning rate).
* cost: two forward/backward passes per step (fewer with a cheap ``mode``); HF's FLOP count
  covers one.

Settings that would quietly turn the step into something else are refused before any weight
changes: DeepSpeed, FSDP, ``optim`` values that update the weights inside ``backward()`` (LOMO,
the layer-wise GaLore/APOLLO ones), an optimizer holding tensors that are not the model's
parameters, one whose ``param_groups`` cannot be shared, and fp16 without a ``GradScaler``.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput
from transformers.utils import is_sagemaker_mp_enabled

from .._util.validate import check_choice
from ..optim import distributed
from ..optim._groups import check_group
from ..optim.batchnorm import frozen_bn_stats
from ..optim.modes import Mode, resolve_mode
from ..optim.sam import GCSAM, SAM, SharpnessAwareOptimizer

__all__ = ["SharpnessAwareArguments", "SharpnessAwareTrainer"]

# Written next to HF's optimizer.pt in every checkpoint folder.
MODE_STATE_NAME = "sharpness_aware.pt"
METHODS = ("gcsam", "sam")
# `optim` values whose optimizers update the weights during backward(): each pass would update.
_STEPS_IN_BACKWARD = ("lomo", "layerwise")


@dataclass
class SharpnessAwareArguments:
    """The sharpness-aware settings of :class:`SharpnessAwareTrainer`; the rest is
    ``TrainingArguments``.

    Args:
        rho: radius of the ascent step ``||eps||`` (in weight units, for ``p=2``).
        method: ``"gcsam"`` (the ascent along the centralized gradient) or ``"sam"``.
        adaptive: ASAM scaling ``eps ~ |w|^2 d`` (Kwon et al., 2021).
        p: ``2`` or ``float("inf")`` (``eps = rho * sign(d)``).
        normalize_by: ``"centralized"`` (``||eps|| == rho``, the paper) or ``"raw"`` (divide by
            the raw gradient's norm, the authors' script).
        gc_scope: GCSAM only: ``"all"`` (every tensor with ndim > 1; the default), ``"conv"``
            (ndim > 3) or ``"none"``.
        gc_descent: GCSAM only: centralize the descent gradient too.
        ascent: under DDP, ``"local"`` (each worker's own gradient; one all-reduce per step) or
            ``"global"`` (the all-reduced gradient; two).
        mode: ``None`` (the full step every step), a name (``"periodic"``, ``"looksam"``,
            ``"momentum"``, ``"adaptive"``) or an instance of :mod:`gcsam.modes`.
    """

    rho: float = 0.05
    method: str = "gcsam"
    adaptive: bool = False
    p: float = 2
    normalize_by: str = "centralized"
    gc_scope: str | None = None
    gc_descent: bool = False
    ascent: str = "local"
    mode: Mode | str | None = None

    def __post_init__(self) -> None:
        # The library's own checks, with the dataclass named: a bad field fails here, not at
        # train(), and not later on another worker.
        try:
            check_choice("method", self.method, METHODS)
            if self.method == "sam" and (self.gc_scope is not None or self.gc_descent):
                raise ValueError(
                    "gc_scope and gc_descent are GCSAM settings (SAM never centralizes): leave "
                    "them unset with method='sam', or use method='gcsam'"
                )
            settings = self._settings()
            check_group(settings, settings, (), 0)
            distributed.check_ascent(self.ascent)
            resolve_mode(self.mode)
        except (TypeError, ValueError) as error:
            raise type(error)(f"SharpnessAwareArguments: {error}") from None

    def _settings(self) -> dict[str, Any]:
        """The param-group settings of the optimizer these arguments describe."""
        scope = "none" if self.method == "sam" else self.gc_scope or "all"
        return dict(
            rho=self.rho,
            adaptive=self.adaptive,
            p=self.p,
            normalize_by=self.normalize_by,
            gc_scope=scope,
            gc_descent=self.gc_descent,
        )

    def _wrap(self, base: Optimizer) -> SharpnessAwareOptimizer:
        """The GCSAM or SAM optimizer on ``base``'s param groups."""
        settings = self._settings()
        common = dict(ascent=self.ascent, mode=self.mode)
        if self.method == "sam":
            del settings["gc_scope"]
            return SAM(None, base, **settings, **common)
        return GCSAM(None, base, **settings, **common)


class SharpnessAwareTrainer(Trainer):
    """A ``Trainer`` whose optimizer steps are sharpness-aware (GCSAM by default).

    Takes the ``Trainer``'s arguments, and ``sharpness_aware`` (default
    ``SharpnessAwareArguments()``; leave it out when ``optimizers=`` gives a
    :class:`~gcsam.SharpnessAwareOptimizer`). After ``train()`` has started,
    :attr:`sharpness_aware_optimizer` is the GCSAM/SAM object (its ``mode`` can be changed
    between steps, e.g. from a callback); ``trainer.optimizer`` is the base optimizer HF steps.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        sharpness_aware: SharpnessAwareArguments | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if sharpness_aware is not None and not isinstance(sharpness_aware, SharpnessAwareArguments):
            raise TypeError(
                f"sharpness_aware must be a SharpnessAwareArguments, got {sharpness_aware!r}"
            )
        if args is not None:  # before the Trainer sets anything up
            _refuse_arguments(args)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._refuse_strategy()  # also when set through accelerate's config or environment
        if isinstance(self.optimizer, SharpnessAwareOptimizer) and sharpness_aware is not None:
            raise ValueError(
                f"optimizers= gives a {type(self.optimizer).__name__} and sharpness_aware= "
                "settings for another: pass one of them (the optimizer's own settings apply)"
            )
        # The settings of the optimizer the trainer builds (none with a given GCSAM/SAM).
        self.sharpness_aware = sharpness_aware or SharpnessAwareArguments()
        self.sharpness_aware_optimizer: SharpnessAwareOptimizer | None = None
        self._window: list[dict[str, Any]] = []  # this accumulation window's micro-batches

    # -- set-up, before any weight changes ------------------------------------------------------

    def _refuse_strategy(self) -> None:
        for enabled, name, why in (
            (self.is_deepspeed_enabled, "DeepSpeed", "it shards and steps the optimizer itself"),
            (
                self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False),
                "FSDP",
                "it shards the weights",
            ),
            (is_sagemaker_mp_enabled(), "SageMaker model parallelism", "it splits the model"),
            (
                getattr(self, "is_distributed_loading_by_transformers", False),
                "a model sharded by from_pretrained",
                "it reduces its own gradients",
            ),
        ):
            if enabled:
                _refuse_sharding(name, why)

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """HF's base optimizer (from ``TrainingArguments`` or ``optimizers=``), wrapped in the
        sharpness-aware optimizer; returns the base, which HF prepares and steps."""
        scaler = self.accelerator.scaler
        if self.args.fp16 and (scaler is None or not scaler.is_enabled()):
            raise ValueError(
                "fp16=True without a GradScaler: accelerate makes none on the CPU (nor does it "
                "autocast there, so the run would silently be fp32), and fp16 gradients overflow "
                "without one; use bf16=True, or fp16 on a GPU"
            )
        if isinstance(self.optimizer, SharpnessAwareOptimizer):  # given as optimizers=(opt, ...)
            self.sharpness_aware_optimizer = self.optimizer
            self.optimizer = self.optimizer.base_optimizer
        base = super().create_optimizer(model)
        while isinstance(base, AcceleratedOptimizer):  # prepared by an earlier train()
            base = base.optimizer
        sam = self.sharpness_aware_optimizer
        if sam is None or sam.base_optimizer is not base:  # new, or a new model (model_init)
            sam = self.sharpness_aware_optimizer = self.sharpness_aware._wrap(base)
        self._check_parameters(sam)
        self._share_param_groups()
        return self.optimizer

    def _check_parameters(self, sam: SharpnessAwareOptimizer) -> None:
        """Every tensor the optimizer steps must be a parameter of the model being trained."""
        own = {id(p) for p in self.model.parameters()}
        foreign = sum(id(p) not in own for g in sam.param_groups for p in g["params"])
        if foreign:
            raise ValueError(
                f"the optimizer holds {foreign} tensor(s) that are not parameters of the model "
                f"({type(sam.base_optimizer).__name__}: a wrapper or a dummy, as layer-wise "
                "optimizers use?): the ascent would not move the model. Build the optimizer on "
                "model.parameters(), or let the Trainer build it from TrainingArguments"
            )

    def _share_param_groups(self, mode_state: dict[str, Any] | None = None) -> None:
        """Make the sharpness-aware optimizer share its base's ``param_groups`` list again, and
        load ``mode_state`` (a checkpoint's ``"sharpness_aware"`` entry) if given.

        ``torch.optim.Optimizer.load_state_dict`` builds a new list: accelerate calls it when it
        places the optimizer on the device, HF when it resumes. The library's
        ``load_state_dict`` re-shares (and checks the settings); loading a state dict of the
        same tensors copies none of them.
        """
        sam = self.sharpness_aware_optimizer
        base = sam.base_optimizer
        if mode_state is None and sam.param_groups is base.param_groups:
            return
        state = base.state_dict()
        if mode_state is not None:
            state["sharpness_aware"] = mode_state
        sam.load_state_dict(state)
        if sam.param_groups is not base.param_groups:
            raise RuntimeError(
                f"{type(base).__name__}.param_groups is a new list at each access, so "
                f"{type(sam).__name__} cannot share it (HF's LR scheduler would not reach the "
                "step it takes): use a base optimizer whose param_groups is a plain list "
                "attribute, as every torch.optim optimizer's is"
            )

    # -- the step -------------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> TrainOutput:
        self._window = []  # none left over from a train() that raised mid-window
        return super().train(*args, **kwargs)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Keep the micro-batch; at the window's last one, take the sharpness-aware part of the
        step over the whole window. Returns the first-pass loss: zero for the micro-batches
        kept, the window's sum (each already divided for accumulation) at its last one."""
        self._window.append(inputs)
        size = self.current_gradient_accumulation_steps  # the window the loop fetched
        if not self.accelerator.sync_gradients:  # the loop steps after a later micro-batch
            if len(self._window) >= size:
                raise RuntimeError(
                    f"the Trainer's loop fetched {size} micro-batches for this step but does not "
                    "step after the last of them: SharpnessAwareTrainer cannot take a "
                    "sharpness-aware step there (an IterableDataset shorter than max_steps?)"
                )
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        if len(window) != size:
            raise RuntimeError(
                f"the Trainer's loop steps after {len(window)} micro-batches of a window of "
                f"{size}: SharpnessAwareTrainer needs the loop of transformers 5 "
                "(Trainer._run_epoch), which steps after the last"
            )
        return self._sharpness_aware_step(model, window, num_items_in_batch)

    def _sharpness_aware_step(
        self, model: nn.Module, window: list[dict[str, Any]], num_items: Tensor | int | None
    ) -> Tensor:
        sam = self.sharpness_aware_optimizer
        if sam is None:
            raise RuntimeError(
                "training_step before create_optimizer(): call trainer.train(), which builds "
                "the sharpness-aware optimizer"
            )
        self._share_param_groups()  # accelerate's prepare() rebuilt the base's groups
        if sam.model is not model:
            if self.args.world_size > 1 and distributed.ddp_of(model) is None:
                raise RuntimeError(
                    f"a {self.args.world_size}-process run whose model reaches training_step as "
                    f"a {type(model).__name__}, not the DistributedDataParallel module: the "
                    "ascent setting cannot control its all-reduces (torch_compile=True wraps "
                    "it; turn that off)"
                )
            sam.model = model  # the DDP module the Trainer wrapped: `ascent` applies to it
        scaler = self.accelerator.scaler
        with sam.ascent_pass():
            loss = self._pass(sam, model, window, num_items)
        sam.first_step(zero_grad=True, scaler=scaler)
        if sam.descending:
            try:
                with frozen_bn_stats(model):
                    self._pass(sam, model, window, num_items)
            except BaseException:
                sam.restore()
                raise
        if not sam.prepare_descent(scaler) and scaler is not None and scaler.is_enabled():
            self._skip_scaled_step(sam)
        return loss  # HF clips the descent gradient and steps the base next

    def _pass(
        self,
        sam: SharpnessAwareOptimizer,
        model: nn.Module,
        window: list[dict[str, Any]],
        num_items: Tensor | int | None,
    ) -> Tensor:
        """One pass: HF's forward and backward of every micro-batch; the summed loss."""
        total = torch.zeros((), device=self.args.device)
        for index, inputs in enumerate(window):
            with sam.micro_batch(last=index == len(window) - 1):
                total += super().training_step(model, sam.pass_batch(inputs), num_items)
        return total

    @staticmethod
    def _skip_scaled_step(sam: SharpnessAwareOptimizer) -> None:
        """Make accelerate's ``scaler.step(base)`` skip the step ``prepare_descent`` refused.

        ``prepare_descent`` cleared the gradients and recorded the overflow, so ``update()``
        lowers the scale; but accelerate steps the base whatever happens, and ``GradScaler``
        asserts when the base has no gradient to check. A non-finite one makes it skip the base
        step, as for any fp16 overflow (and HF the LR scheduler, for an unfused base).
        """
        param = next(p for group in sam.param_groups for p in group["params"])
        param.grad = torch.full_like(param, math.nan)

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:  # the mode's state is the same on every worker
            mode_state = self.sharpness_aware_optimizer.state_dict()["sharpness_aware"]
            torch.save(mode_state, os.path.join(output_dir, MODE_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # the base's state and the scheduler's
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, MODE_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"{checkpoint} has no {MODE_STATE_NAME} (a plain Trainer's checkpoint?): the "
                "sharpness-aware mode's state (its step count) starts afresh",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        try:
            self._share_param_groups(_read_mode_state(path))
        except ValueError as error:
            where = "" if str(error).startswith(path) else f"{path}: "
            raise ValueError(f"{where}{error}") from None


def _read_mode_state(path: str) -> dict[str, Any]:
    """The mode's state saved in a checkpoint's ``sharpness_aware.pt``, or a ``ValueError``
    naming the file. Never unpickles code: torch's own message for that case advises
    ``weights_only=False``, which would run it, so it is not passed on."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: not a torch file of tensors and plain values (only a "
            "SharpnessAwareTrainer's can be resumed): restore it, or resume from another "
            "checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"{path}: not a torch file ({str(error).splitlines()[0][:120]}); restore it, or "
            "resume from another checkpoint"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected the mode's state (a dict), got a {type(state).__name__}; "
            "restore it, or resume from another checkpoint"
        )
    return state


def _refuse_arguments(args: TrainingArguments) -> None:
    """Refuse the ``TrainingArguments`` a sharpness-aware step cannot run under."""
    if args.deepspeed:
        _refuse_sharding("DeepSpeed", "it shards and steps the optimizer itself")
    if args.fsdp:
        _refuse_sharding("FSDP", "it shards the weights")
    optim = getattr(args.optim, "value", args.optim)
    if any(word in str(optim) for word in _STEPS_IN_BACKWARD):
        raise ValueError(
            f"optim={optim!r} updates the weights inside backward(), so both passes of a "
            "sharpness-aware step would update them: choose another optim (e.g. 'adamw_torch')"
        )


def _refuse_sharding(name: str, why: str) -> None:
    raise ValueError(
        f"SharpnessAwareTrainer does not support {name} ({why}; the sharpness-aware step "
        "perturbs and restores whole weights): train in one process or with DDP (torchrun)"
    )
