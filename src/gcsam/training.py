"""One training run: data, model and optimizer from a :class:`TrainConfig`, a run directory with
``config.json``, ``metrics.jsonl``, ``summary.json``, ``best.pt``/``final.pt`` and a ``last.pt``
checkpoint from which a killed run resumes bit-identically."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from . import __version__
from ._json import strict_json
from .batchnorm import frozen_bn_stats
from .centralization import centralize_gradient
from .data import Augment, DataSplits, Split, iterate_batches, load_dataset
from .metrics import classification_metrics, time_to_target
from .models import build_model, describe_model
from .report import read_history
from .sam import GCSAM, SAM

OPTIMIZERS = ("sgd", "adam", "adamw", "gc-sgd", "gc-adam", "gc-adamw", "sam", "asam", "gcsam")
BASES = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")
AUGMENTATIONS = ("auto", "none", "crop", "flip", "crop+flip")
AMP_MODES = ("none", "bf16", "fp16")
SELECT_BY = ("val_accuracy", "val_loss")
_BASE_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# Data sets of natural or medical photographs, where crops and mirror images are still the class.
_PHOTO_DATASETS = ("cifar10", "cifar100", "image-folder")


# The paper's setups (Hassan et al., 2025, and the authors' released CIFAR-10 script). They need
# the data (never downloaded) and, at full size, a GPU: ResNet-50 at 224-256 px trains at a few
# images per second on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "paper-cifar10": dict(
        dataset="cifar10", model="resnet50", image_size=224, base="adam", lr=1e-4, rho=0.05,
        weight_decay=0.0, batch_size=128, epochs=120, schedule="none", augment="crop+flip",
        patience=10, select_by="val_loss",
    ),
    "paper-bus": dict(
        dataset="image-folder", classes=["benign", "malignant"], image_size=256,
        model="resnet50", base="adam", lr=1e-4, rho=0.05, weight_decay=0.0, batch_size=32,
        epochs=100, schedule="none", augment="crop+flip", patience=10, select_by="val_loss",
    ),
    "paper-covid": dict(
        dataset="image-folder", image_size=256, model="resnet50", base="adam", lr=1e-4,
        rho=0.05, weight_decay=0.0, batch_size=32, epochs=100, schedule="none",
        augment="crop+flip", patience=10, select_by="val_loss",
    ),
}  # fmt: skip


class ConfigError(ValueError):
    """A training setting is invalid; the message names it and what is allowed."""


@dataclass
class TrainConfig:
    """Every setting of one run; ``None`` means "the default for this optimizer / data set"."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    classes: list[str] | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    folds: int | None = None
    fold: int = 0
    model: str = "small-cnn"
    width: float = 1.0
    depth: int | None = None
    widen_factor: int | None = None
    patch_size: int | None = None
    dropout: float = 0.0
    optimizer: str = "gcsam"
    base: str = "adam"
    rho: float | None = None
    normalize_by: str = "centralized"
    gc_scope: str = "all"
    gc_descent: bool = False
    ascent: str = "local"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    augment: str = "auto"
    patience: int | None = None
    select_by: str = "val_accuracy"
    target_accuracy: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in and every setting checked."""
        cfg = dataclasses.replace(self)
        _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
        _check_choice("base", cfg.base, BASES)
        for name, choices in (
            ("schedule", SCHEDULES),
            ("augment", AUGMENTATIONS),
            ("amp", AMP_MODES),
            ("select_by", SELECT_BY),
            ("device", ("auto", "cpu", "cuda")),
            ("ascent", ("local", "global")),
        ):
            _check_choice(name, getattr(cfg, name), choices)
        base = self.base_name()
        if cfg.lr is None:
            cfg.lr = 0.05 if base == "sgd" else 1e-3
        if cfg.weight_decay is None:
            cfg.weight_decay = {"sgd": 5e-4, "adam": 0.0, "adamw": 1e-2}[base]
        if cfg.rho is None and cfg.optimizer in ("sam", "asam", "gcsam"):
            cfg.rho = 0.5 if cfg.optimizer == "asam" else 0.05
        if cfg.augment == "auto":
            cfg.augment = "crop+flip" if cfg.dataset in _PHOTO_DATASETS else "none"
        for name in ("lr", "epochs", "batch_size"):
            if not getattr(cfg, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)!r}")
        for name in ("weight_decay", "warmup_epochs", "label_smoothing", "dropout", "momentum"):
            if not getattr(cfg, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
        if cfg.rho is not None and not cfg.rho >= 0:
            raise ConfigError(f"rho must be >= 0, got {cfg.rho!r}")
        if cfg.label_smoothing >= 1:
            raise ConfigError(f"label_smoothing must be below 1, got {cfg.label_smoothing!r}")
        if cfg.patience is not None and cfg.patience < 1:
            raise ConfigError(f"patience must be at least 1 epoch, got {cfg.patience!r}")
        if cfg.target_accuracy is not None and not 0 < cfg.target_accuracy <= 1:
            raise ConfigError(
                f"target_accuracy is a fraction in (0, 1], got {cfg.target_accuracy!r}"
            )
        return cfg

    def base_name(self) -> str:
        """The underlying first-order optimizer: ``base`` for the SAM family, else the name."""
        if self.optimizer in ("sam", "asam", "gcsam"):
            return self.base
        return self.optimizer.removeprefix("gc-")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"known settings: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when present; under torchrun, each worker takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu"
        )
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


@dataclass(frozen=True)
class World:
    """This process's place among the workers ``torchrun`` started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main worker writes files and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def join_world(device: str) -> World:
    """Join the process group that torchrun's environment describes (``gloo`` on CPU, ``nccl``
    on CUDA), once; a plain process is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        cuda = pick_device(device, local_rank).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)


def is_main_process() -> bool:
    """False on every torchrun worker but rank 0."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not initialized or torch.distributed.get_rank() == 0


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, ddp: nn.Module | None = None
) -> torch.optim.Optimizer:
    """The optimizer a resolved config names; ``gc-*`` optimizers centralize in the loop. The
    SAM family gets the DDP wrapper ``ddp`` (when training under torchrun) and ``cfg.ascent``."""
    base = cfg.base_name()
    kwargs: dict[str, Any] = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if base == "sgd":
        kwargs["momentum"] = cfg.momentum
    base_class = _BASE_CLASSES[base]
    family = dict(rho=cfg.rho, model=ddp, ascent=cfg.ascent)
    if cfg.optimizer == "gcsam":
        return GCSAM(
            model.parameters(),
            base_class,
            normalize_by=cfg.normalize_by,
            gc_scope=cfg.gc_scope,
            gc_descent=cfg.gc_descent,
            **family,
            **kwargs,
        )
    if cfg.optimizer in ("sam", "asam"):
        return SAM(
            model.parameters(), base_class, adaptive=cfg.optimizer == "asam", **family, **kwargs
        )
    return base_class(model.parameters(), **kwargs)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``step`` (linear warmup, then the schedule)."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return factor


def select_classes(splits: DataSplits, names: list[str]) -> DataSplits:
    """Keep only the named classes (e.g. BUSI's benign and malignant), relabelled 0..K-1."""
    missing = [n for n in names if n not in splits.class_names]
    if missing:
        raise ConfigError(
            f"classes {missing} are not in the data set; its classes are {splits.class_names}"
        )
    old = torch.tensor([splits.class_names.index(n) for n in names])

    def keep(split: Split) -> Split:
        mask = (split.labels.unsqueeze(1) == old).any(1)
        relabel = (split.labels[mask].unsqueeze(1) == old).int().argmax(1)
        return Split(split.images[mask], relabel)

    return dataclasses.replace(
        splits,
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        class_names=list(names),
    )


def prepare_data(cfg: TrainConfig) -> DataSplits:
    splits = load_dataset(
        cfg.dataset,
        cfg.data_dir,
        image_size=cfg.image_size,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        folds=cfg.folds,
        fold=cfg.fold,
    )
    return select_classes(splits, cfg.classes) if cfg.classes else splits


def to_json_text(value: Any, indent: int | None = 2) -> str:
    """Strict JSON: NaN and infinities (an undefined ROC AUC, say) become null."""
    return json.dumps(strict_json(value), indent=indent, allow_nan=False)


def build_run_model(cfg: TrainConfig, data: DataSplits) -> nn.Module:
    """The run's model, initialized from its seed, for the data set's shape and classes."""
    torch.manual_seed(cfg.seed)
    channels, height, _ = data.image_shape
    return build_model(
        cfg.model,
        data.num_classes,
        channels,
        height,
        width=cfg.width,
        depth=cfg.depth,
        widen_factor=cfg.widen_factor,
        patch_size=cfg.patch_size,
        dropout=cfg.dropout,
    )


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, to_json_text(value).encode())


def save_checkpoint_atomic(path: Path, value: Any) -> None:
    """``torch.save`` with the guarantees of :func:`write_atomic`."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_atomic(path, buffer.getvalue())


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a kill at
    any moment leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def versions() -> dict[str, str]:
    return {
        "gcsam": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@dataclass
class _Progress:
    """Everything about the loop that a resumed run must get back."""

    epoch: int = 0
    step: int = 0
    wall_time_s: float = 0.0
    best_epoch: int = 0
    best_score: float = -math.inf
    epochs_since_best: int = 0


class Trainer:
    """Trains one model into ``run_dir``; ``run()`` starts or resumes."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, progress: bool | None = None):
        self.cfg = cfg.resolved()
        self.run_dir = Path(run_dir)
        self.world = join_world(self.cfg.device)
        self.show_progress = progress if self.world.main else False
        self.device = pick_device(self.cfg.device, self.world.local_rank)
        self.data = prepare_data(self.cfg)
        self.model = build_run_model(self.cfg, self.data).to(self.device)
        # The module the batches go through: the DDP wrapper when torchrun started workers.
        self.net: nn.Module = self.model
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.type == "cuda"
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None
            )
        self.optimizer = build_optimizer(
            self.cfg, self.model, self.net if self.world.size > 1 else None
        )
        shard = math.ceil(len(self.data.train) / self.world.size)
        self.steps_per_epoch = math.ceil(shard / self.cfg.batch_size)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.cfg, self.steps_per_epoch)
        )
        amp = self.cfg.amp
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.data_rng = torch.Generator().manual_seed(self.cfg.seed)
        # Each worker augments its own shard with its own stream.
        self.augment_rng = torch.Generator().manual_seed(self.cfg.seed + 1 + self.world.rank)
        self.augment = self._build_augment()
        self.state = _Progress()

    def _build_augment(self) -> Augment | None:
        mode = self.cfg.augment
        if mode == "none":
            return None
        return Augment(
            crop_padding=4 if "crop" in mode else 0, flip="flip" in mode, generator=self.augment_rng
        )

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
            "versions": versions(),
        }
        write_json_atomic(self.run_dir / "config.json", record)

    def _checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "progress": dataclasses.asdict(self.state),
            "rng": {
                "torch": self._per_rank(torch.get_rng_state()),
                "data": self.data_rng.get_state(),
                "augment": self._per_rank(self.augment_rng.get_state()),
                "cuda": self._per_rank(torch.cuda.get_rng_state(self.device))
                if self.device.type == "cuda"
                else [],
            },
        }

    def _per_rank(self, state: Tensor) -> list[Tensor]:
        """Every worker's copy of an RNG state (the same size on each), for the checkpoint."""
        if self.world.size == 1:
            return [state]
        local = state.to(self.device)  # nccl gathers CUDA tensors only; gloo takes either
        states = [torch.empty_like(local) for _ in range(self.world.size)]
        torch.distributed.all_gather(states, local)
        return [t.cpu() for t in states]

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if self.scaler and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = _Progress(**ckpt["progress"])
        rng = ckpt["rng"]
        if len(rng["augment"]) != self.world.size:
            raise ConfigError(
                f"{self.last_path} was written by {len(rng['augment'])} worker(s); resume it "
                f"with as many (torchrun --nproc-per-node), not {self.world.size}"
            )
        rank = self.world.rank
        torch.set_rng_state(rng["torch"][rank])
        self.data_rng.set_state(rng["data"])
        self.augment_rng.set_state(rng["augment"][rank])
        if rng["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank], self.device)

    def _history(self) -> list[dict[str, Any]]:
        return read_history(self.run_dir)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(to_json_text(record, indent=None) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _truncate_history(self, epochs: int) -> None:
        """Drop epochs logged after the checkpoint a resumed run starts from."""
        kept = [r for r in self._history() if r["epoch"] <= epochs]
        write_atomic(
            self.run_dir / "metrics.jsonl",
            "".join(to_json_text(r, indent=None) + "\n" for r in kept).encode(),
        )

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

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[float, int]:
        """One optimizer step on a batch; returns (summed first-pass loss, correct count)."""
        model, opt, scaler = self.model, self.optimizer, self.scaler
        first: dict[str, Tensor] = {}

        def forward_backward() -> Tensor:
            opt.zero_grad()
            perturbed = isinstance(opt, GCSAM) and opt.perturbed
            with self._autocast(), frozen_bn_stats(model, enabled=perturbed):
                logits = self.net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            (scaler.scale(loss) if scaler else loss).backward()
            if not perturbed:
                first["logits"], first["loss"] = logits.detach(), loss.detach()
            return loss

        if isinstance(opt, GCSAM):
            opt.step(forward_backward, scaler=scaler)
        else:
            forward_backward()
            if self.cfg.optimizer.startswith("gc-"):
                if scaler:
                    scaler.unscale_(opt)
                centralize_gradient([p.grad for p in model.parameters()])
            if scaler:
                scaler.step(opt)
            else:
                opt.step()
        if scaler:
            scaler.update()
        self.schedule.step()
        correct = int((first["logits"].argmax(1) == y).sum())
        return float(first["loss"]) * len(y), correct

    @torch.no_grad()
    def evaluate(self, split: Split) -> dict[str, Any]:
        """Loss and every classification metric of the current model on ``split``; under
        torchrun each worker scores every ``size``-th example and all get the same numbers."""
        self.model.eval()
        world = self.world
        mine = torch.arange(world.rank, len(split), world.size)
        logits = [
            self.model(self._inputs(images, train=False)).float()
            for images, _ in iterate_batches(
                split, max(256, self.cfg.batch_size), shuffle=False, indices=mine
            )
        ]
        local = torch.cat(logits) if logits else torch.empty(0, self.data.num_classes)
        return classification_metrics(self._gather_rows(local, len(split)).cpu(), split.labels)

    def _gather_rows(self, local: Tensor, total: int) -> Tensor:
        """The rows every worker computed for its strided share, back in the split's order."""
        if self.world.size == 1:
            return local
        size = self.world.size
        longest = math.ceil(total / size)
        padded = torch.zeros(longest, local.shape[1], device=local.device, dtype=local.dtype)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(size)]
        torch.distributed.all_gather(parts, padded)
        rows = torch.empty(total, local.shape[1], device=local.device, dtype=local.dtype)
        for rank, part in enumerate(parts):
            count = len(range(rank, total, size))
            rows[rank::size] = part[:count]
        return rows

    def _epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.world.size == 1:
            return iterate_batches(
                self.data.train, self.cfg.batch_size, shuffle=True, generator=self.data_rng
            )
        # DistributedSampler's rule: one order for all (same generator state on every worker),
        # padded with its own head to a multiple of the worker count, then strided shards.
        count, size = len(self.data.train), self.world.size
        order = torch.randperm(count, generator=self.data_rng)
        order = torch.cat([order, order[: math.ceil(count / size) * size - count]])
        return iterate_batches(
            self.data.train,
            self.cfg.batch_size,
            shuffle=False,
            indices=order[self.world.rank :: size],
        )

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or early stop) and write ``summary.json``; returns the summary.
        Under torchrun every worker trains its shard and only rank 0 writes files."""
        main = self.world.main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.world.barrier()
        summary_path = self.run_dir / "summary.json"
        if resume and summary_path.exists():
            return json.loads(summary_path.read_text())
        if resume and self.last_path.exists():
            self._restore(load_checkpoint(self.last_path))
            if main:
                self._truncate_history(self.state.epoch)
                for partial in self.run_dir.glob(".*.tmp"):  # left by a kill mid-write
                    partial.unlink()
        elif main:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            self._write_config()
        self.world.barrier()  # every worker has read what it needs before rank 0 moves on
        if main:
            summary_path.unlink(missing_ok=True)
        bar = progress_bar(
            total=self.cfg.epochs,
            initial=self.state.epoch,
            desc=self._label(),
            show=self.show_progress,
        )
        with bar:
            while self.state.epoch < self.cfg.epochs and not self._should_stop():
                record = self._train_epoch()
                bar.update(1)
                bar.set_postfix_str(
                    f"val acc {100 * record['val_accuracy']:.2f}% loss {record['val_loss']:.4f}"
                )
        return self._finish()

    def _label(self) -> str:
        return f"{self.cfg.optimizer} seed {self.cfg.seed}"

    def _should_stop(self) -> bool:
        patience = self.cfg.patience
        return patience is not None and self.state.epochs_since_best >= patience

    def _train_epoch(self) -> dict[str, Any]:
        """One pass over the training data, validation, the epoch's log line and checkpoint."""
        self.model.train()
        start = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        batches = progress_bar(
            self._epoch_batches(),
            total=self.steps_per_epoch,
            desc=f"epoch {self.state.epoch + 1}",
            show=self.show_progress,
            leave=False,
        )
        for images, y in batches:
            x, y = self._inputs(images, train=True), y.to(self.device)
            loss, hits = self._train_step(x, y)
            total_loss, correct, seen = total_loss + loss, correct + hits, seen + len(y)
            self.state.step += 1
        if self.world.size > 1:
            totals = torch.tensor(
                [total_loss, correct, seen], dtype=torch.float64, device=self.device
            )
            torch.distributed.all_reduce(totals)
            total_loss, correct, seen = totals.tolist()
        val = self.evaluate(self.data.val)
        elapsed = time.perf_counter() - start
        self.state.epoch += 1
        self.state.wall_time_s += elapsed
        record = {
            "epoch": self.state.epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            **{f"val_{k}": v for k, v in val.items() if k != "confusion_matrix"},
            "epoch_time_s": elapsed,
            "wall_time_s": self.state.wall_time_s,
        }
        score = val["accuracy"] if self.cfg.select_by == "val_accuracy" else -val["loss"]
        improved = score > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_epoch = score, self.state.epoch
            self.state.epochs_since_best = 0
        else:
            self.state.epochs_since_best += 1
        checkpoint = self._checkpoint()  # every worker: it gathers their RNG states
        if self.world.main:
            if improved:
                save_checkpoint_atomic(self.run_dir / "best.pt", {"model": checkpoint["model"]})
            self._append_metrics(record)
            save_checkpoint_atomic(self.last_path, checkpoint)
        return record

    def _finish(self) -> dict[str, Any]:
        """Evaluate the best-on-validation model on test; write ``final.pt`` and the summary."""
        self.world.barrier()  # best.pt is complete
        self.model.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["model"])
        val, test = self.evaluate(self.data.val), self.evaluate(self.data.test)
        if self.world.main:
            save_checkpoint_atomic(
                self.run_dir / "final.pt",
                {"model": self.model.state_dict(), "config": self.cfg.to_json()},
            )
        history = self._history()
        target = self.cfg.target_accuracy
        epochs_to_target, time_to = (
            time_to_target(history, target) if target is not None else (None, None)
        )
        summary = {
            "optimizer": self.cfg.optimizer,
            "seed": self.cfg.seed,
            "status": "finished",
            "best_epoch": self.state.best_epoch,
            "epochs_run": self.state.epoch,
            "stopped_early": self.state.epoch < self.cfg.epochs,
            "total_time_s": self.state.wall_time_s,
            "target_val_accuracy": target,
            "epochs_to_target": epochs_to_target,
            "time_to_target_s": time_to,
            "val": val,
            "test": test,
        }
        if self.world.main:
            write_json_atomic(self.run_dir / "summary.json", summary)
        self.world.barrier()
        return summary


def progress_bar(iterable: Any = None, *, show: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr; ``show=None`` shows it only when stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if show is None else not show, dynamic_ncols=True, **kwargs)


def train(
    cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from its ``last.pt`` when ``resume``)."""
    return Trainer(cfg, run_dir, progress=progress).run(resume=resume)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a run directory was started with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} does not exist")
    values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_json({k: v for k, v in values.items() if k in known})


def load_trained(
    run_dir: str | Path, checkpoint: str = "final.pt"
) -> tuple[TrainConfig, DataSplits, nn.Module]:
    """Rebuild a finished run's config, data splits and model (with the checkpoint's weights,
    in eval mode, on the CPU) from its run directory."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir).resolved()
    path = run_dir / checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {checkpoint}: the run has not finished; "
            f"finish it with 'gcsam resume {run_dir}'"
        )
    data = prepare_data(cfg)
    model = build_run_model(cfg, data)
    model.load_state_dict(load_checkpoint(path)["model"])
    return cfg, data, model.eval()


def prepared_batches(
    data: DataSplits, split: str, batch_size: int, max_samples: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Normalized ``(x, y)`` batches of a split (no augmentation), for evaluation-style work;
    the first ``max_samples`` examples when given (in the split's fixed order)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test; got {split!r}")
    chosen: Split = getattr(data, split)
    count = len(chosen) if max_samples is None else min(max_samples, len(chosen))
    if count < 1:
        raise ConfigError(f"max_samples must be at least 1, got {max_samples!r}")
    return [
        (data.normalize(images), labels)
        for images, labels in iterate_batches(
            chosen, batch_size, shuffle=False, indices=torch.arange(count)
        )
    ]
