"""GCSAM in PyTorch Lightning: a callback and one call in ``training_step``.

A sharpness-aware step needs two forward/backward passes, which Lightning's automatic
optimization cannot run (it calls ``optimizer.step`` once per batch, and under ``16-mixed`` hands
the optimizer to a ``GradScaler`` that takes no closure). So the module turns automatic
optimization off, and :func:`sharpness_aware_step` takes the whole step::

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False  # sharpness_aware_step takes the step
            self.net = ...

        def loss(self, batch):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def training_step(self, batch, batch_idx):
            loss = sharpness_aware_step(self, batch, self.loss)
            if loss is not None:  # None: a micro-batch inside an accumulation window
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return GCSAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    trainer = L.Trainer(callbacks=[SharpnessAware(accumulate_grad_batches=2,
                                                  gradient_clip_val=1.0)])

What each Lightning setting does here:

* ``precision``: ``"32-true"``, ``"bf16-mixed"`` (both passes under Lightning's autocast) and
  ``"16-mixed"`` (a ``GradScaler``: each pass's gradients are unscaled before use, and an
  overflow in either pass skips the step and lowers the scale, as in automatic optimization).
* ``strategy="ddp"``: the optimizer is given the DDP model at the start of training, so its
  ``ascent`` holds: ``"local"`` all-reduces the gradients once per step (the descent pass),
  ``"global"`` twice. Other strategies (FSDP, DeepSpeed) are refused.
* accumulation and clipping: Lightning refuses ``Trainer(accumulate_grad_batches=...)`` and
  ``Trainer(gradient_clip_val=...)`` under manual optimization; give them to
  :class:`SharpnessAware` instead. The micro-batches of a window are kept and both passes run
  over all of them at the window's last one, so every weight change happens within one
  ``training_step``; the loss is the mean over the window's micro-batches (a shorter last window
  of an epoch too). Clipping applies to the descent gradient, the one the base optimizer takes.
* BatchNorm statistics move only in the first pass (:func:`gcsam.frozen_bn_stats`).
* LR schedulers from ``configure_optimizers`` step as under automatic optimization, through
  the module's ``lr_scheduler_step``: ``"step"`` ones every ``frequency`` optimizer steps,
  ``"epoch"`` ones at the end of every ``frequency``-th epoch; one stepped elsewhere too is an
  error (or pass ``step_schedulers=False`` and step them yourself). ``ReduceLROnPlateau`` is
  left to you: Lightning drops its ``monitor`` under manual optimization.
* checkpoints: the optimizer's ``state_dict`` (the base optimizer's, with the cheap modes'
  state) is saved and restored by Lightning, so ``Trainer.fit(ckpt_path=...)`` resumes.
* ``trainer.global_step`` counts optimizer steps, and ``on_before_optimizer_step`` hooks run
  once per step, before clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "gcsam.integrations.lightning needs PyTorch Lightning: pip install 'gcsam[lightning]'",
        name=error.name,
    ) from error

from ..optim.batchnorm import frozen_bn_stats
from ..optim.sam import SharpnessAwareOptimizer

__all__ = ["SharpnessAware", "sharpness_aware_step"]

_CLIP_ALGORITHMS = ("norm", "value")


class SharpnessAware(pl.Callback):
    """Runs :func:`sharpness_aware_step` correctly for the trainer it is given to.

    Args:
        accumulate_grad_batches: micro-batches per optimizer step (Lightning's own setting is
            refused under manual optimization).
        gradient_clip_val: clip the descent gradient to this norm (or value); ``None``: no
            clipping.
        gradient_clip_algorithm: ``"norm"`` (the total 2-norm) or ``"value"`` (each entry).
        step_schedulers: step the LR schedulers of ``configure_optimizers`` (all but
            ``ReduceLROnPlateau``) as automatic optimization would.
    """

    def __init__(
        self,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        step_schedulers: bool = True,
    ) -> None:
        if isinstance(accumulate_grad_batches, bool) or not isinstance(
            accumulate_grad_batches, int
        ):
            raise TypeError(
                f"accumulate_grad_batches must be an int, got {accumulate_grad_batches!r}"
            )
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if gradient_clip_val is not None and not (
            isinstance(gradient_clip_val, int | float)
            and not isinstance(gradient_clip_val, bool)
            and math.isfinite(gradient_clip_val)
            and gradient_clip_val > 0
        ):
            raise ValueError(
                f"gradient_clip_val must be a finite number > 0 or None, got {gradient_clip_val!r}"
            )
        if gradient_clip_algorithm not in _CLIP_ALGORITHMS:
            raise ValueError(
                "gradient_clip_algorithm must be 'norm' or 'value', "
                f"got {gradient_clip_algorithm!r}"
            )
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        if not isinstance(step_schedulers, bool):
            raise TypeError(f"step_schedulers must be True or False, got {step_schedulers!r}")
        self.step_schedulers = step_schedulers
        self._window: list[Any] = []  # the current accumulation window's micro-batches
        # Each scheduler's last_epoch after this callback last stepped it: a change meanwhile
        # means it is stepped elsewhere too, which would step it twice.
        self._stepped: dict[int, int] = {}

    # -- checks, before any weight changes -----------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if pl_module.automatic_optimization:
            raise RuntimeError(
                "SharpnessAware needs manual optimization: set self.automatic_optimization = "
                "False in the LightningModule's __init__ and call sharpness_aware_step(self, "
                "batch, loss_fn) in training_step (automatic optimization cannot run the two "
                "passes: BatchNorm, DDP syncing and 16-mixed would go wrong)"
            )
        strategy = trainer.strategy
        if not isinstance(strategy, SingleDeviceStrategy | DDPStrategy) or isinstance(
            strategy,
            DeepSpeedStrategy,  # a DDPStrategy that shards the optimizer
        ):
            raise RuntimeError(
                f"SharpnessAware supports the single-device and DDP strategies, not "
                f"{type(trainer.strategy).__name__}: use strategy='ddp' (or none)"
            )
        plugin = trainer.precision_plugin
        if trainer.precision == "16-mixed" and (
            not isinstance(plugin, MixedPrecision) or plugin.scaler is None
        ):
            raise RuntimeError(
                "precision='16-mixed' without a GradScaler: fp16 gradients overflow silently; "
                "give MixedPrecision a scaler (the default) or use precision='bf16-mixed'"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = _optimizer(pl_module)
        if optimizer.param_groups is not optimizer.base_optimizer.param_groups:
            raise RuntimeError(
                f"{type(optimizer).__name__} no longer shares its param_groups with its base "
                f"optimizer ({type(optimizer.base_optimizer).__name__}): something replaced "
                "one of them after construction; build the optimizer in configure_optimizers "
                "and return it unwrapped"
            )
        if not all(
            hasattr(o, hook)
            for o in trainer.strategy._lightning_optimizers
            for hook in ("_on_before_step", "_on_after_step")
        ):
            raise RuntimeError(
                f"this Lightning version ({pl.__version__}) has no step-counting hooks on its "
                "LightningOptimizer; gcsam.integrations.lightning supports lightning>=2.1"
            )
        # Lightning wraps the module in DDP after configure_optimizers built the optimizer.
        optimizer.model = trainer.strategy.model
        self._window = []
        self._stepped = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_schedulers(trainer, pl_module, "epoch", trainer.current_epoch + 1)

    # -- the step ------------------------------------------------------------------------------

    def step(
        self, module: pl.LightningModule, batch: Any, loss_fn: Callable[[Any], Tensor]
    ) -> Tensor | None:
        """See :func:`sharpness_aware_step`."""
        trainer = module.trainer
        self._window.append(batch)
        if len(self._window) < self.accumulate_grad_batches and not trainer.is_last_batch:
            return None
        window, self._window = self._window, []
        optimizer = _optimizer(module)
        lightning_optimizer = module.optimizers()
        plugin = trainer.precision_plugin
        scaler = plugin.scaler if isinstance(plugin, MixedPrecision) else None

        def run_pass() -> Tensor:
            """Forward and backward over the window; the mean loss (detached)."""
            losses = []
            for index, micro_batch in enumerate(window):
                with optimizer.micro_batch(last=index == len(window) - 1):
                    loss = loss_fn(optimizer.pass_batch(micro_batch)) / len(window)
                    module.manual_backward(loss)  # scales under 16-mixed; DDP's reducer
                losses.append(loss.detach().float())
            return torch.stack(losses).sum()

        # Lightning's own step counting (global_step) and profiling of optimizer steps.
        lightning_optimizer._on_before_step()
        optimizer.zero_grad()
        with optimizer.ascent_pass():
            loss = run_pass()
        optimizer.first_step(zero_grad=True, scaler=scaler)
        if optimizer.descending:
            try:
                with frozen_bn_stats(module):
                    run_pass()
            except BaseException:
                optimizer.restore()
                raise
        ready = optimizer.prepare_descent(scaler)
        if scaler is not None:
            scaler.unscale_(optimizer.base_optimizer)  # clip and hooks see the true gradient
        for callback in trainer.callbacks:
            callback.on_before_optimizer_step(trainer, module, optimizer)
        module.on_before_optimizer_step(optimizer)
        if self.gradient_clip_val is not None:
            module.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )
        if ready:
            if scaler is not None:
                scaler.step(optimizer.base_optimizer)  # skips on an overflow in the descent pass
            else:
                optimizer.base_optimizer.step()
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad()
        lightning_optimizer._on_after_step()
        self._step_schedulers(trainer, module, "step", trainer.global_step)
        return loss

    def _step_schedulers(
        self, trainer: pl.Trainer, module: pl.LightningModule, interval: str, count: int
    ) -> None:
        """Step the ``interval`` schedulers due at the ``count``-th step or epoch."""
        if not self.step_schedulers:
            return
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if (
                config.interval != interval
                or count % config.frequency
                or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            ):
                continue
            if self._stepped.get(id(scheduler), scheduler.last_epoch) != scheduler.last_epoch:
                raise RuntimeError(
                    f"{type(scheduler).__name__} was stepped outside SharpnessAware too, which "
                    "steps it already: remove your scheduler.step() call, or pass "
                    "SharpnessAware(step_schedulers=False)"
                )
            module.lr_scheduler_step(scheduler, None)
            self._stepped[id(scheduler)] = scheduler.last_epoch


def sharpness_aware_step(
    module: pl.LightningModule, batch: Any, loss_fn: Callable[[Any], Tensor]
) -> Tensor | None:
    """Take ``module``'s sharpness-aware step on ``batch``; call it from ``training_step``.

    ``loss_fn(batch)`` returns the scalar loss of one (micro-)batch, computed with ``module``'s
    layers; it runs once per pass. The trainer must have a :class:`SharpnessAware` callback and
    ``configure_optimizers`` must return one :class:`~gcsam.SharpnessAwareOptimizer`.

    Returns the first-pass loss (detached; the mean over the accumulation window) when the step
    was taken, ``None`` for a micro-batch that only joined the window.
    """
    trainer = module.trainer
    callbacks = [c for c in trainer.callbacks if isinstance(c, SharpnessAware)]
    if len(callbacks) != 1:
        raise RuntimeError(
            f"sharpness_aware_step needs exactly one SharpnessAware callback in the Trainer, "
            f"found {len(callbacks)}: Trainer(callbacks=[SharpnessAware(...)])"
        )
    return callbacks[0].step(module, batch, loss_fn)


def _optimizer(module: pl.LightningModule) -> SharpnessAwareOptimizer:
    """The module's one optimizer, which must be sharpness-aware."""
    optimizers = module.trainer.optimizers
    if len(optimizers) != 1 or not isinstance(optimizers[0], SharpnessAwareOptimizer):
        names = ", ".join(type(o).__name__ for o in optimizers) or "none"
        raise RuntimeError(
            "configure_optimizers must return one GCSAM or SAM optimizer (a "
            f"gcsam.SharpnessAwareOptimizer), got: {names}"
        )
    return optimizers[0]
