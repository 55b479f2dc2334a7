"""One training run: data, model and optimizer from a :class:`TrainConfig`, trained into a run
directory (:mod:`gcsam.toolkit.rundir`) from which a killed run resumes bit-identically, under
torchrun too (each worker trains its shard; rank 0 writes).

The state a resumed run gets back bit for bit, and its checkpoint, are
:class:`~gcsam.toolkit.run_state.RunState`; what a run is built from is in
:mod:`~gcsam.toolkit.run_inputs`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .._util.progress import progress_bar
from ..optim.batchnorm import frozen_bn_stats
from ..optim.centralization import centralize_gradient
from ..optim.distributed import local
from ..optim.schedules import ProportionalRho
from .averaging import build_average
from .config import ConfigError, TrainConfig
from .data import Split, iterate_batches
from .metrics import classification_metrics, time_to_target
from .models import describe_model
from .optimizers import OPTIMIZERS, StepKind, build_optimizer
from .penalties import head_penalties
from .run_inputs import build_augment, build_run_model, epoch_order, lr_factor, prepare_data
from .run_state import RunState, fitting
from .rundir import (
    METRICS_FILE,
    append_history,
    load_checkpoint,
    read_history,
    read_summary,
    remove_partial_writes,
    run_lock,
    save_checkpoint_atomic,
    truncate_history,
    versions,
    write_json_atomic,
)
from .world import check_strategy, join_world, pick_device

# What a run writes into its directory, and all that ``overwrite`` deletes there.
_RUN_FILES = ("config.json", METRICS_FILE, "summary.json", "*.pt", "sharpness.json", "landscape-*")


class Diverged(RuntimeError):  # noqa: N818 (the name the CLI and callers know)
    """The training loss or the weights became non-finite; ``summary.json`` says where, and the
    run's checkpoints hold the last finite weights."""


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether no element of ``tensors`` is NaN or infinite: one fused max-abs per dtype, then a
    single host sync (max-abs, unlike a sum or 2-norm, cannot overflow finite values)."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return True
    norms = torch._foreach_norm(floats, math.inf)
    return bool(torch.stack([n.float() for n in norms]).isfinite().all())


AfterEpoch = Callable[[int, float], None]
"""Called after each epoch's checkpoint with the epoch (from 1) and the best validation score so
far (the run's ``select_by``: accuracy, or minus the loss); what it raises stops the run, which
then resumes from that checkpoint."""


class Trainer:
    """Trains one model into ``run_dir``; ``run()`` starts or resumes."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        progress: bool | None = None,
        after_epoch: AfterEpoch | None = None,
    ):
        self.cfg = cfg.resolved()
        self.run_dir = Path(run_dir)
        self.after_epoch = after_epoch
        self.world = join_world(self.cfg.device, self.cfg.ddp_timeout_s)
        # A study file or a resumed run may ask for FSDP too, past the command line's check.
        check_strategy(
            self.cfg.strategy,
            self.world.size,
            average=self.cfg.average,
            penalties=bool(self.cfg.feature_penalty or self.cfg.head_penalty),
        )
        self.show_progress = progress if self.world.main else False
        self.device = pick_device(self.cfg.device, self.world.local_rank)
        self.data, self.regime_record = prepare_data(self.cfg)
        self.model = build_run_model(self.cfg, self.data).to(self.device)
        self.net, self.fsdp = self.world.distribute(self.model, self.cfg.strategy, self.device)
        self.penalties = head_penalties(self.model, self.cfg.feature_penalty, self.cfg.head_penalty)
        # The weights the run evaluates, selects and saves (None: the live ones).
        self.average = build_average(self.cfg, self.model)
        self.spec = OPTIMIZERS[self.cfg.optimizer]
        ddp = self.net if self.world.size > 1 and self.fsdp is None else None
        self.optimizer = build_optimizer(self.cfg, self.model, ddp)
        shard = math.ceil(len(self.data.train) / self.world.size)
        self.steps_per_epoch = math.ceil(shard / self.cfg.batch_size)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.cfg, self.steps_per_epoch)
        )
        # After the LR schedule, which it follows.
        self.rho_schedule = (
            ProportionalRho(self.optimizer)
            if self.spec.sharpness_aware and self.cfg.rho_schedule == "lr"
            else None
        )
        amp = self.cfg.amp
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.data_rng = torch.Generator().manual_seed(self.cfg.seed)
        # Each worker augments its own shard with its own stream.
        self.augment_rng = torch.Generator().manual_seed(self.cfg.seed + 1 + self.world.rank)
        self.augment = build_augment(self.cfg.augment, self.augment_rng)
        self.resumable = RunState(
            world=self.world,
            device=self.device,
            model=self.model,
            optimizer=self.optimizer,
            schedule=self.schedule,
            rho_schedule=self.rho_schedule,
            scaler=self.scaler,
            average=self.average,
            data_rng=self.data_rng,
            augment_rng=self.augment_rng,
            fsdp=self.fsdp,
        )
        self.progress = self.resumable.progress

    # -- files --------------------------------------------------------------------------------

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    def _write_config(self) -> None:
        record = self.cfg.to_json() | {
            "num_classes": self.data.num_classes,
            "class_names": self.data.class_names,
            "image_shape": list(self.data.image_shape),
            "split_sizes": {
                "train": len(self.data.train),
                "val": len(self.data.val),
                "test": len(self.data.test),
            },
            "model_size": describe_model(self.model),
            "regime": self.regime_record,
            "versions": versions(),
        }
        write_json_atomic(self.run_dir / "config.json", record)

    # -- training -----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _inputs(self, images: Tensor, train: bool) -> Tensor:
        x = self.data.normalize(images).to(self.device, non_blocking=True)
        if train and self.augment is not None:
            x = self.augment(x)
        return x

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[float, int, int]:
        """One optimizer step on a batch; returns the first pass's (summed loss, correct count,
        examples): all of the batch, or the part an ascent-fraction mode ascends from."""
        model, opt, scaler = self.model, self.optimizer, self.scaler
        first: dict[str, Tensor] = {}

        def forward_backward() -> Tensor:
            # The descent pass neither updates BN statistics nor is logged, even when rho = 0
            # left the weights where they were: the run then matches the base optimizer's.
            descending = self.spec.sharpness_aware and opt.descending
            xb, yb = opt.pass_batch((x, y)) if self.spec.sharpness_aware else (x, y)
            self.progress.passes += len(yb) / len(y)
            opt.zero_grad()
            with self._autocast(), frozen_bn_stats(model, enabled=descending):
                logits = self.net(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=self.cfg.label_smoothing)
                objective = loss if self.penalties is None else loss + self.penalties()
            (scaler.scale(objective) if scaler else objective).backward()
            if not descending:  # the cross-entropy alone is logged, comparable across runs
                first["logits"], first["loss"], first["labels"] = logits.detach(), loss.detach(), yb
            return objective

        if self.spec.step is StepKind.SHARPNESS_AWARE:
            opt.step(forward_backward, scaler=scaler)
        else:
            forward_backward()
            if self.spec.step is StepKind.CENTRALIZED:
                if scaler:
                    scaler.unscale_(opt)
                centralize_gradient([p.grad for p in model.parameters()])
            if scaler:
                scaler.step(opt)
            else:
                opt.step()
        if scaler:
            scaler.update()
        if self.average is not None:
            self.average.after_step(self.model)
        self.schedule.step()
        if self.rho_schedule is not None:
            self.rho_schedule.step()
        labels = first["labels"]
        correct = int((first["logits"].argmax(1) == labels).sum())
        return float(first["loss"]) * len(labels), correct, len(labels)

    def _evaluated(self) -> nn.Module:
        """The model the run validates and selects: the weight average once it has started."""
        return self.average.module(self.model) if self.average else self.model

    @torch.no_grad()
    def evaluate(self, split: Split, model: nn.Module | None = None) -> dict[str, Any]:
        """Loss and every classification metric of ``model`` (default: the live model) on
        ``split``; under
        torchrun each worker scores every ``size``-th example and all get the same numbers
        (under FSDP every worker scores every example: each forward is a collective, so the
        workers must run the same batches)."""
        model = self.model if model is None else model
        model.eval()
        world = self.world
        spread = world.size > 1 and self.fsdp is None
        mine = torch.arange(world.rank, len(split), world.size) if spread else None
        logits = [
            model(self._inputs(images, train=False)).float()
            for images, _ in iterate_batches(
                split, max(256, self.cfg.batch_size), shuffle=False, indices=mine
            )
        ]
        scored = torch.cat(logits) if logits else torch.empty(0, self.data.num_classes)
        if spread:
            scored = world.gather_rows(scored, len(split))
        return classification_metrics(scored.cpu(), split.labels)

    def _bn_inputs(self) -> Iterator[Tensor]:
        """This worker's training images in order, unaugmented: BatchNorm statistics for SWA."""
        shard = torch.arange(self.world.rank, len(self.data.train), self.world.size)
        for images, _ in iterate_batches(
            self.data.train, max(256, self.cfg.batch_size), shuffle=False, indices=shard
        ):
            yield self._inputs(images, train=False)

    def _epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iterate_batches(
            self.data.train,
            self.cfg.batch_size,
            shuffle=False,
            indices=epoch_order(len(self.data.train), self.world, self.data_rng),
        )

    def run(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train to the end (or early stop) and write ``summary.json``; returns the summary.
        Under torchrun every worker trains its shard and only rank 0 writes files, holding the
        run directory's lock throughout.

        Without ``resume``, a directory that already holds a run is refused unless
        ``overwrite``, which deletes that run's files first. Raises :class:`Diverged` when the
        loss or the weights become non-finite (also when resuming a run that did).
        """
        lock = run_lock(self.run_dir) if self.world.main else contextlib.nullcontext()
        with lock, self.world.timeouts_explained():
            return self._run(resume, overwrite)

    def _run(self, resume: bool, overwrite: bool) -> dict[str, Any]:
        main = self.world.main
        self.world.check_shared(self.run_dir, self.device)  # before any worker reads a file
        if not resume and (self.run_dir / "config.json").exists():
            if not overwrite:
                raise ConfigError(
                    f"{self.run_dir} already holds a run; resume it with "
                    f"'gcsam resume {self.run_dir}' or pass --overwrite to start over"
                )
            self.world.barrier()  # every worker has seen the old run before rank 0 deletes it
            if main:  # the old run's files only: not the lock, nor anything the user put there
                for pattern in _RUN_FILES:
                    for path in filter(Path.is_file, self.run_dir.glob(pattern)):
                        path.unlink()
        self.world.barrier()
        summary_path = self.run_dir / "summary.json"
        if resume and summary_path.exists():
            summary = read_summary(self.run_dir)
            assert summary is not None
            if summary.get("status") == "diverged":
                raise Diverged(summary.get("error", f"{self.run_dir} diverged"))
            return summary
        if resume and self.last_path.exists():
            self.resumable.restore(load_checkpoint(self.last_path), self.last_path)
            if main:
                truncate_history(self.run_dir, self.progress.epoch)
                remove_partial_writes(self.run_dir)
        elif main:
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
            self._write_config()
        self.world.barrier()  # every worker has read what it needs before rank 0 moves on
        if main:
            summary_path.unlink(missing_ok=True)
        bar = progress_bar(
            total=self.cfg.epochs,
            initial=self.progress.epoch,
            desc=f"{self.cfg.row} seed {self.cfg.seed}",
            show=self.show_progress,
        )
        with bar:
            while self.progress.epoch < self.cfg.epochs and not self._should_stop():
                record = self._train_epoch()
                bar.update(1)
                bar.set_postfix_str(
                    f"val acc {100 * record['val_accuracy']:.2f}% loss {record['val_loss']:.4f}"
                )
                if self.after_epoch is not None:
                    self.after_epoch(self.progress.epoch, self.progress.best_score)
        return self._finish()

    def _should_stop(self) -> bool:
        patience = self.cfg.patience
        return patience is not None and self.progress.epochs_since_best >= patience

    def _train_epoch(self) -> dict[str, Any]:
        """One pass over the training data, validation, the epoch's log line and checkpoint."""
        self.model.train()
        start = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        passes, steps = self.progress.passes, self.progress.step
        batches = progress_bar(
            self._epoch_batches(),
            total=self.steps_per_epoch,
            desc=f"epoch {self.progress.epoch + 1}",
            show=self.show_progress,
            leave=False,
        )
        for images, y in batches:
            x, y = self._inputs(images, train=True), y.to(self.device)
            loss, hits, count = self._train_step(x, y)
            total_loss, correct, seen = total_loss + loss, correct + hits, seen + count
            self.progress.step += 1
        if self.world.size > 1:
            totals = torch.tensor(
                [total_loss, correct, seen], dtype=torch.float64, device=self.device
            )
            torch.distributed.all_reduce(totals)
            total_loss, correct, seen = totals.tolist()
        if self.fsdp is not None:
            # FSDP, unlike DDP, leaves every worker its own BatchNorm statistics: each would
            # score (and stop) differently. All evaluate and save rank 0's, as under DDP.
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        # Before validation (sklearn refuses NaN scores) and the checkpoints of this epoch.
        self._check_finite(self.progress.epoch + 1, total_loss)
        if self.average is not None:
            self.average.after_epoch(
                self.progress.epoch + 1,
                self.model,
                self._bn_inputs,
                share=(lambda t: torch.distributed.broadcast(t, src=0))
                if self.world.size > 1
                else None,
            )
        val = self.evaluate(self.data.val, self._evaluated())
        elapsed = time.perf_counter() - start
        self.progress.epoch += 1
        self.progress.wall_time_s += elapsed
        record = {
            "epoch": self.progress.epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            **{f"val_{k}": v for k, v in val.items() if k != "confusion_matrix"},
            "epoch_time_s": elapsed,
            "wall_time_s": self.progress.wall_time_s,
            "passes_per_step": (self.progress.passes - passes) / max(self.progress.step - steps, 1),
        }
        score = val["accuracy"] if self.cfg.select_by == "val_accuracy" else -val["loss"]
        improved = score > self.progress.best_score
        if improved:
            self.progress.best_score, self.progress.best_epoch = score, self.progress.epoch
            self.progress.epochs_since_best = 0
        else:
            self.progress.epochs_since_best += 1
        checkpoint = self.resumable.checkpoint()  # every worker: it gathers their RNG states
        if self.world.main:
            if improved:
                best = self._evaluated().state_dict() if self.average else checkpoint["model"]
                save_checkpoint_atomic(self.run_dir / "best.pt", {"model": best})
            append_history(self.run_dir, record)
            save_checkpoint_atomic(self.last_path, checkpoint)
        return record

    def _finish(self) -> dict[str, Any]:
        """Evaluate the last epoch's model and the best-on-validation model on test; write
        ``final.pt`` (the best) and the summary."""
        last_test = self.evaluate(self.data.test, self._evaluated())["accuracy"]
        self.world.barrier()  # best.pt is complete
        best = self.run_dir / "best.pt"
        with fitting(best):
            self.resumable.load_model_state(load_checkpoint(best)["model"])
        self._check_finite(self.progress.epoch)
        val, test = self.evaluate(self.data.val), self.evaluate(self.data.test)
        final = self.resumable.model_state()
        if self.world.main:
            save_checkpoint_atomic(
                self.run_dir / "final.pt", {"model": final, "config": self.cfg.to_json()}
            )
        history = read_history(self.run_dir)
        target = self.cfg.target_accuracy
        epochs_to_target, time_to = (
            time_to_target(history, target) if target is not None else (None, None)
        )
        return self._write_summary(
            "finished",
            stopped_early=self.progress.epoch < self.cfg.epochs,
            target_val_accuracy=target,
            epochs_to_target=epochs_to_target,
            time_to_target_s=time_to,
            test_accuracy_last_epoch=last_test,
            val=val,
            test=test,
        )

    def _write_summary(self, status: str, **fields: Any) -> dict[str, Any]:
        """Write ``summary.json``: what every run's holds, then ``fields``; returns it."""
        summary = {
            "optimizer": self.cfg.optimizer,
            "seed": self.cfg.seed,
            "status": status,
            "best_epoch": self.progress.best_epoch,
            "epochs_run": self.progress.epoch,
            "total_time_s": self.progress.wall_time_s,
            "passes_per_step": self.progress.passes
            / max(self.progress.step - self.progress.counted_from_step, 1),
            # in all, when counted from the first step (not a run resumed from before the count)
            "passes": self.progress.passes if self.progress.counted_from_step == 0 else None,
            **({"label": self.cfg.label} if self.cfg.label else {}),
            **fields,
        }
        if self.world.main:
            write_json_atomic(self.run_dir / "summary.json", summary)
        self.world.barrier()
        return summary

    def _check_finite(self, epoch: int, loss: float = 0.0) -> None:
        """Raise :class:`Diverged` on every worker alike when the summed training loss or the
        model's weights (parameters and buffers) are not finite, before anything is saved."""
        problem = 0 if math.isfinite(loss) else 1
        if not problem and not _all_finite(local(self.model.state_dict().values())):
            problem = 2
        problem = self.world.highest(problem, self.device)
        if not problem:
            return
        what = f"the training loss is {loss}" if problem == 1 else "the weights are not finite"
        last = (
            f"the last good checkpoint is {self.last_path}"
            if self.last_path.exists()
            else "no checkpoint had been written yet"
        )
        at = {"epoch": epoch, "step": self.progress.step}
        message = (
            f"diverged at epoch {epoch}, step {at['step']}: {what} (lower --lr, now "
            f"{self.cfg.lr:g}, or add --warmup-epochs); {last}"
        )
        self._write_summary("diverged", diverged_at=at, error=message)
        raise Diverged(message)


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    after_epoch: AfterEpoch | None = None,
) -> dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from its ``last.pt`` when ``resume``; replacing
    a run already there only with ``overwrite``); see :meth:`Trainer.run` and
    :data:`AfterEpoch`."""
    trainer = Trainer(cfg, run_dir, progress=progress, after_epoch=after_epoch)
    return trainer.run(resume=resume, overwrite=overwrite)
