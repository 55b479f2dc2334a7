"""``gcsam.integrations.transformers`` against hand-written loops with the same seed and batches.

Each Hugging Face run trains a tiny model made here (no downloads) and is checked against an
independent loop over the same batches: the library's two-step API (``first_step``, a second
pass under ``frozen_bn_stats``, ``prepare_descent``) with the base optimizer, LR schedule,
clipping, autocast and ``GradScaler`` written out as HF configures them; one test against the
float64 formulas of ``reference.py``. DDP runs in two gloo workers launched the way ``torchrun``
would (its environment variables), with the gradient all-reduces counted by a comm hook.

fp16: accelerate neither autocasts nor scales fp16 on the CPU (``Accelerator.native_amp`` stays
False and ``scaler`` None, so ``fp16=True`` trains in fp32 there), which the trainer refuses.
The fp16 path is tested by giving accelerate, after the ``Trainer`` is built, what it builds on
a GPU: ``native_amp=True`` (fp16 autocast, here CPU autocast) and a real ``GradScaler("cpu")``,
which accelerate then uses for ``backward``, unscaling, clipping and the step as on a GPU.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from reference import F64, Cfg, RefSGD, model_loss_fn, sam_step
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback, TrainingArguments

from gcsam import GCSAM, SAM, AscentFraction, LookSAM, MomentumAscent, Periodic, frozen_bn_stats
from gcsam.integrations.transformers import (
    SharpnessAwareArguments,
    SharpnessAwareTrainer,
)

# Whole (tiny) training runs through the framework's Trainer: `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

RHO, LR, WEIGHT_DECAY, MAX_GRAD_NORM = 0.1, 1e-2, 0.01, 0.5
BATCH = 4


# Model, data and runs -----------------------------------------------------------------------------


class Net(nn.Module):
    """Linear -> [BatchNorm1d] -> ReLU -> Linear; returns HF's ``{"loss", "logits"}``."""

    def __init__(self, bn: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.fc2 = nn.Linear(8, 3)
        self.forwards = 0
        self.infinite_forward: int | None = None  # this forward's loss is inf (1-based count)

    def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.fc2(torch.relu(self.bn(self.fc1(x))))
        loss = F.cross_entropy(logits, labels)
        self.forwards += 1
        if self.forwards == self.infinite_forward:
            loss = loss * math.inf
        return {"loss": loss, "logits": logits}


class Data(torch.utils.data.Dataset):
    """``n`` samples ``{"x": (6,), "labels": ()}``; ``batch(a, b)`` stacks samples a..b-1,
    ``take(indices)`` those listed."""

    def __init__(self, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.x[index], "labels": self.labels[index]}

    def batch(self, start: int, stop: int) -> dict[str, Tensor]:
        return self.take(list(range(start, stop)))

    def take(self, indices: list[int]) -> dict[str, Tensor]:
        return {"x": self.x[indices], "labels": self.labels[indices]}


def arguments(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """One process on the CPU, batches in dataset order, a log entry per step."""
    settings: dict[str, Any] = dict(
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=BATCH,
        max_steps=4,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(str(output_dir), **(settings | overrides))


class Recorder(TrainerCallback):
    """Weights after every optimizer step, and the GradScaler's scale when there is one."""

    def __init__(self, trainer: SharpnessAwareTrainer) -> None:
        self.trainer = trainer
        self.weights: list[dict[str, Tensor]] = []
        self.scales: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.weights.append(snapshot(self.trainer.model))
        scaler = self.trainer.accelerator.scaler
        if scaler is not None:
            self.scales.append(scaler.get_scale())


def train(
    model: nn.Module,
    args: TrainingArguments,
    data: Data | None = None,
    fp16_as_on_a_gpu: bool = False,
    **trainer_kwargs: Any,
) -> tuple[SharpnessAwareTrainer, Recorder]:
    trainer = SharpnessAwareTrainer(
        model=model, args=args, train_dataset=data or Data(), **trainer_kwargs
    )
    if fp16_as_on_a_gpu:  # what accelerate sets up for fp16 on a GPU (see the module docstring)
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def logged(trainer: SharpnessAwareTrainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if "step" in entry and key in entry]


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers (BatchNorm statistics), cloned."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


# The hand-written loop ----------------------------------------------------------------------------


def hf_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """HF's weight-decay groups: biases without (and LayerNorms, parameters named *norm*: none
    here)."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if "bias" not in n], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0},
    ]


def adamw(fused: bool = True) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """HF's default base optimizer (``optim="adamw_torch_fused"``; ``"adamw_torch"`` unfused)."""
    return lambda model: torch.optim.AdamW(hf_param_groups(model), lr=LR, fused=fused)


def hand_loop(
    model: Net,
    windows: list[list[dict[str, Tensor]]],
    *,
    method: type = GCSAM,
    make_base: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lr_lambda: Callable[[int], float] | None = None,
    **sam_kwargs: Any,
) -> dict[str, Any]:
    """HF's step written out with the library's two-step API: the base optimizer (HF's
    default: ``adamw()``), the LR factor ``lr_lambda`` (HF's default: a linear decay to 0 over
    ``len(windows)`` steps), clipping of the descent gradient to ``MAX_GRAD_NORM``; a window's
    loss is the mean of its micro-batches' mean losses. With ``scaler``, an overflow in either
    pass steps neither the base nor the LR schedule. Returns per step: first-pass losses,
    gradient norms before clipping, learning rates, and the weights after the step."""
    base = (make_base or adamw())(model)
    opt = method(None, base, rho=RHO, **sam_kwargs)
    steps = len(windows)
    schedule = torch.optim.lr_scheduler.LambdaLR(base, lr_lambda or (lambda t: (steps - t) / steps))
    result: dict[str, list[Any]] = {"losses": [], "grad_norms": [], "lrs": [], "weights": []}

    def run_pass(window: list[dict[str, Tensor]]) -> float:
        total = 0.0
        for inputs in window:
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
                loss = model(**opt.pass_batch(inputs))["loss"] / len(window)
            (loss if scaler is None else scaler.scale(loss)).backward()
            total += loss.item()
        return total

    model.train()
    for window in windows:
        with opt.ascent_pass():
            loss = run_pass(window)
        opt.first_step(zero_grad=True, scaler=scaler)
        if opt.descending:
            with frozen_bn_stats(model):
                run_pass(window)
        ready = opt.prepare_descent(scaler)
        if scaler is not None and ready:
            scaler.unscale_(base)
        result["losses"].append(loss)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        result["grad_norms"].append(norm.item())
        result["lrs"].append(base.param_groups[0]["lr"])
        overflow = False
        if ready and scaler is None:
            base.step()
        elif ready:
            scaler.step(base)  # skips on an overflow in the descent pass
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.update()
            overflow = scaler.get_scale() < scale  # backoff: an overflow in either pass
        if not overflow:  # accelerate reports the scaler's skips, and HF then holds the LR
            schedule.step()
        opt.zero_grad()
        result["weights"].append(snapshot(model))
    return result


def windows_of(data: Data, sizes: list[list[int]]) -> list[list[dict[str, Tensor]]]:
    """Consecutive micro-batches of ``data``: ``sizes[step]`` lists the step's batch sizes."""
    result, start = [], 0
    for step in sizes:
        window = []
        for size in step:
            window.append(data.batch(start, start + size))
            start += size
        result.append(window)
    return result


def assert_same_run(
    trainer: SharpnessAwareTrainer,
    recorder: Recorder,
    hand: dict[str, Any],
    atol: float = 0.0,
    skipped: tuple[int, ...] = (),
) -> None:
    """The weights after every step, and the logged losses, learning rates and gradient norms
    (except the ``skipped`` steps' loss and norm: HF's ``logging_nan_inf_filter`` replaces an
    infinite loss, and the norm of a skipped step is NaN)."""
    assert len(recorder.weights) == len(hand["weights"])
    for actual, expected in zip(recorder.weights, hand["weights"], strict=True):
        assert_same(actual, expected, atol)
    assert logged(trainer, "learning_rate") == pytest.approx(hand["lrs"], rel=1e-12)
    for key, values in (("loss", hand["losses"]), ("grad_norm", hand["grad_norms"])):
        for step, (actual, expected) in enumerate(zip(logged(trainer, key), values, strict=True)):
            if step not in skipped:
                assert actual == pytest.approx(expected, rel=1e-6), (key, step)


# Same seed, same batches: the hand-written loop ---------------------------------------------------


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("method", ["gcsam", "sam"])
def test_trainer_equals_the_hand_loop(tmp_path: Path, method: str, bn: bool) -> None:
    """HF's default AdamW (fused), linear decay and clipping; with BatchNorm, the running
    statistics move in the first pass only (they are in the compared state dicts)."""
    trainer, recorder = train(
        Net(bn),
        arguments(tmp_path),
        sharpness_aware=SharpnessAwareArguments(rho=RHO, method=method),
    )
    hand = hand_loop(
        Net(bn), windows_of(Data(), [[BATCH]] * 4), method={"gcsam": GCSAM, "sam": SAM}[method]
    )
    assert_same_run(trainer, recorder, hand, atol=1e-6)
    assert trainer.model.forwards == 2 * 4  # two passes per step
    sam = trainer.sharpness_aware_optimizer
    assert type(sam) is {"gcsam": GCSAM, "sam": SAM}[method]
    # One list of groups, though accelerate rebuilt the base's when it prepared it: what HF's
    # optimizer holds (learning rates, or rho written there by a schedule) is what GCSAM uses.
    assert sam.param_groups is trainer.optimizer.param_groups


@pytest.mark.parametrize(
    ("mode", "forwards"),
    [
        (Periodic(2), 2 + 1 + 2 + 1),
        (LookSAM(2, alpha=0.5), 2 + 1 + 2 + 1),
        (MomentumAscent(), 4),
        (AscentFraction(0.5), 2 * 4),
    ],
)
def test_cheap_modes_equal_the_hand_loop(tmp_path: Path, mode: Any, forwards: int) -> None:
    """A step without ascent takes one pass; MomentumAscent's pass runs at its own point;
    AscentFraction's first pass on half of each batch."""
    trainer, recorder = train(
        Net(bn=True),
        arguments(tmp_path),
        sharpness_aware=SharpnessAwareArguments(rho=RHO, mode=mode),
    )
    hand = hand_loop(Net(bn=True), windows_of(Data(), [[BATCH]] * 4), mode=mode)
    assert_same_run(trainer, recorder, hand, atol=1e-6)
    assert trainer.model.forwards == forwards


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(adaptive=True, normalize_by="raw", gc_descent=True),
        dict(method="sam", p=math.inf),
    ],
)
def test_the_step_is_the_formulas_step_in_float64(tmp_path: Path, settings: dict) -> None:
    """Against ``reference.py`` (the formulas in float64, no gcsam code): plain SGD, constant
    learning rate, no clipping, no weight decay."""
    trainer, _ = train(
        Net(),
        arguments(
            tmp_path, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0, weight_decay=0
        ),
        sharpness_aware=SharpnessAwareArguments(rho=RHO, **settings),
    )
    model, data = Net(), Data()
    cfg = dict(settings)
    cfg["gc_scope"] = "none" if cfg.pop("method", "gcsam") == "sam" else "all"
    cfgs = [Cfg(rho=RHO, **cfg)] * len(list(model.parameters()))
    weights = [p.detach().to(F64) for p in model.parameters()]
    base = RefSGD(lr=LR)
    for step in range(4):
        batch = data.batch(step * BATCH, (step + 1) * BATCH)
        x = batch["x"].to(F64)
        f = model_loss_fn(model, lambda forward, x=x, y=batch["labels"]: forward(x, y)["loss"])
        weights, _ = sam_step(f, weights, cfgs, base)
    for actual, expected in zip(trainer.model.parameters(), weights, strict=True):
        torch.testing.assert_close(actual.detach().to(F64), expected, rtol=0, atol=1e-6)


def test_a_given_sharpness_aware_optimizer_and_scheduler_are_used(tmp_path: Path) -> None:
    """``optimizers=(GCSAM(...), scheduler)``: HF steps its base and the scheduler built on it."""
    model = Net()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    trainer, recorder = train(model, arguments(tmp_path), optimizers=(opt, schedule))
    assert trainer.sharpness_aware_optimizer is opt
    assert trainer.optimizer.optimizer is opt.base_optimizer  # accelerate's wrapper

    hand = hand_loop(
        Net(),
        windows_of(Data(), [[BATCH]] * 4),
        make_base=lambda net: torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9),
        lr_lambda=lambda t: 0.5**t,
    )
    assert_same_run(trainer, recorder, hand, atol=1e-6)


# Gradient accumulation ----------------------------------------------------------------------------


def test_accumulation_equals_one_batch_of_the_window(tmp_path: Path) -> None:
    """``gradient_accumulation_steps=2`` with batches of 2 is the step on batches of 4, both
    passes over the whole window; 9 micro-batches make a last window of one (a batch of 2).
    The logged loss is the window's first-pass loss, ``train_loss`` their mean."""
    data = Data(18)
    trainer, recorder = train(
        Net(),
        arguments(
            tmp_path,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=-1,
            num_train_epochs=1,
        ),
        data,
        sharpness_aware=SharpnessAwareArguments(rho=RHO),
    )
    hand = hand_loop(Net(), windows_of(data, [[4], [4], [4], [4], [2]]))
    assert_same_run(trainer, recorder, hand, atol=1e-6)
    assert trainer.model.forwards == 2 * 9  # every micro-batch in both passes
    train_loss = trainer.state.log_history[-1]["train_loss"]
    assert train_loss == pytest.approx(sum(hand["losses"]) / 5, rel=1e-6)


# Checkpoints --------------------------------------------------------------------------------------


def resume_arguments(output_dir: Path) -> TrainingArguments:
    """6 steps over 4-step epochs in shuffled order (HF's sampler; its RNG state is saved)."""
    return arguments(
        output_dir,
        max_steps=6,
        train_sampling_strategy="random",
        save_strategy="steps",
        save_steps=3,
    )


def optimizer_state(trainer: SharpnessAwareTrainer) -> dict[str, Any]:
    return trainer.sharpness_aware_optimizer.state_dict()


@pytest.mark.parametrize("mode", [None, Periodic(2)], ids=["full", "periodic"])
def test_resume_is_bit_identical(tmp_path: Path, mode: Periodic | None) -> None:
    """Resumed at step 3 of 6: the weights, BatchNorm statistics, the base optimizer's state and
    the mode's step count equal the uninterrupted run's bit for bit (Periodic(2) ascends on
    steps 0, 2, 4: a lost step count would ascend on 3 and 5 instead)."""
    sharpness_aware = SharpnessAwareArguments(rho=RHO, mode=mode)
    full, _ = train(
        Net(bn=True), resume_arguments(tmp_path / "full"), Data(16), sharpness_aware=sharpness_aware
    )
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "sharpness_aware.pt").is_file()

    resumed = SharpnessAwareTrainer(
        model=Net(bn=True),
        args=resume_arguments(tmp_path / "resumed"),
        train_dataset=Data(16),
        sharpness_aware=sharpness_aware,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert_same(snapshot(resumed.model), snapshot(full.model))
    expected, actual = optimizer_state(full), optimizer_state(resumed)
    assert actual["sharpness_aware"]["steps"] == expected["sharpness_aware"]["steps"] == 6
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)
    # Still shared after HF loaded the base's state: the step used HF's learning rates.
    sam = resumed.sharpness_aware_optimizer
    assert sam.param_groups is sam.base_optimizer.param_groups


class _Code:
    def __reduce__(self) -> tuple:
        return (print, ("unpickled code ran",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a torch file", "not a torch file"),
        (None, "not a torch file of tensors and plain values"),  # a pickle that runs code
        ({"mode": "periodic", "steps": "abc"}, "'steps' must be an integer >= 0"),
        ([1, 2], "expected the mode's state"),
    ],
    ids=["bytes", "code", "bad-entry", "list"],
)
def test_a_damaged_mode_state_is_refused_naming_the_file(
    tmp_path: Path, content: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Never torch's text advising ``weights_only=False``, which would run the code."""
    sharpness_aware = SharpnessAwareArguments(rho=RHO, mode=Periodic(2))
    train(Net(), resume_arguments(tmp_path / "full"), Data(16), sharpness_aware=sharpness_aware)
    state_file = tmp_path / "full" / "checkpoint-3" / "sharpness_aware.pt"
    if isinstance(content, bytes):
        state_file.write_bytes(content)
    else:
        torch.save(_Code() if content is None else content, state_file)
    resumed = SharpnessAwareTrainer(
        model=Net(),
        args=resume_arguments(tmp_path / "resumed"),
        train_dataset=Data(16),
        sharpness_aware=sharpness_aware,
    )
    with pytest.raises(ValueError, match=message) as error:
        resumed.train(resume_from_checkpoint=str(state_file.parent))
    assert str(error.value).startswith(str(state_file)) and "weights_only" not in str(error.value)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_resume_without_the_mode_state_warns_and_restarts_its_count(tmp_path: Path) -> None:
    """A checkpoint without ``sharpness_aware.pt`` (a plain Trainer's) resumes with a warning;
    Periodic(2) then counts from 0 again, so the run differs from the uninterrupted one."""
    sharpness_aware = SharpnessAwareArguments(rho=RHO, mode=Periodic(2))
    full, _ = train(
        Net(), resume_arguments(tmp_path / "full"), Data(16), sharpness_aware=sharpness_aware
    )
    checkpoint = tmp_path / "full" / "checkpoint-3"
    (checkpoint / "sharpness_aware.pt").unlink()
    resumed = SharpnessAwareTrainer(
        model=Net(),
        args=resume_arguments(tmp_path / "resumed"),
        train_dataset=Data(16),
        sharpness_aware=sharpness_aware,
    )
    with pytest.warns(RuntimeWarning, match=r"no sharpness_aware\.pt"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert optimizer_state(resumed)["sharpness_aware"]["steps"] == 3
    assert not torch.equal(resumed.model.fc1.weight, full.model.fc1.weight)


def test_resume_with_another_mode_is_refused(tmp_path: Path) -> None:
    train(Net(), resume_arguments(tmp_path / "full"), Data(16))
    resumed = SharpnessAwareTrainer(
        model=Net(),
        args=resume_arguments(tmp_path / "resumed"),
        train_dataset=Data(16),
        sharpness_aware=SharpnessAwareArguments(mode="periodic"),
    )
    with pytest.raises(ValueError, match="saved with mode 'full'"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))


# Mixed precision ----------------------------------------------------------------------------------


def test_bf16_equals_the_same_autocast_by_hand(tmp_path: Path) -> None:
    trainer, recorder = train(
        Net(bn=True),
        arguments(tmp_path, bf16=True),
        sharpness_aware=SharpnessAwareArguments(rho=RHO),
    )
    hand = hand_loop(Net(bn=True), windows_of(Data(), [[BATCH]] * 4), autocast=torch.bfloat16)
    assert_same_run(trainer, recorder, hand, atol=1e-6)


def test_fp16_on_the_cpu_is_refused(tmp_path: Path) -> None:
    """accelerate makes no GradScaler (and no autocast) for fp16 on the CPU."""
    model = Net()
    before = snapshot(model)
    trainer = SharpnessAwareTrainer(
        model=model, args=arguments(tmp_path, fp16=True), train_dataset=Data()
    )
    with pytest.raises(ValueError, match="fp16=True without a GradScaler"):
        trainer.train()
    assert_same(snapshot(model), before)


@pytest.mark.parametrize(
    ("infinite_forward", "where"), [(None, "none"), (3, "ascent"), (4, "descent")]
)
def test_fp16_scaled_steps_and_overflows_equal_the_hand_loop(
    tmp_path: Path, infinite_forward: int | None, where: str
) -> None:
    """fp16 as accelerate runs it on a GPU (module docstring). An infinite loss in step 1's
    ascent pass (forward 3) or descent pass (forward 4) skips that step: weights unchanged, the
    scale halved, the LR schedule not stepped; the other steps equal the hand loop's. Unfused
    AdamW: accelerate tells a skipped step from a taken one by whether the scaler called it,
    which it cannot for a fused optimizer (it unscales and skips inside its own step)."""
    model = Net()
    model.infinite_forward = infinite_forward
    trainer, recorder = train(
        model,
        arguments(tmp_path, fp16=True, optim="adamw_torch"),
        fp16_as_on_a_gpu=True,
        sharpness_aware=SharpnessAwareArguments(rho=RHO),
    )
    reference = Net()
    reference.infinite_forward = infinite_forward
    hand = hand_loop(
        reference,
        windows_of(Data(), [[BATCH]] * 4),
        make_base=adamw(fused=False),
        autocast=torch.float16,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
    )
    skipped = () if infinite_forward is None else (1,)
    assert_same_run(trainer, recorder, hand, atol=1e-6, skipped=skipped)
    if infinite_forward is None:
        assert recorder.scales == [2.0**8] * 4
    else:
        assert_same(recorder.weights[1], recorder.weights[0])
        assert recorder.scales == [2.0**8, 2.0**7, 2.0**7, 2.0**7]
        lrs = logged(trainer, "learning_rate")
        assert lrs[2] == lrs[1]  # the scheduler did not step with the skipped step


def test_a_nonfinite_ascent_gradient_without_a_scaler_skips_the_step(tmp_path: Path) -> None:
    """fp32: step 1's ascent loss is infinite (forward 3). GCSAM warns and clears the
    gradients; the base step HF takes then changes nothing, and the next steps go on."""
    model = Net()
    model.infinite_forward = 3
    with pytest.warns(RuntimeWarning, match="ascent gradient is not finite"):
        trainer, recorder = train(
            model, arguments(tmp_path), sharpness_aware=SharpnessAwareArguments()
        )
    assert_same(recorder.weights[1], recorder.weights[0])
    assert not torch.equal(recorder.weights[2]["fc1.weight"], recorder.weights[1]["fc1.weight"])
    assert trainer.sharpness_aware_optimizer.state_dict()["sharpness_aware"]["steps"] == 4


# DDP under torchrun's environment -----------------------------------------------------------------

WORLD, STEPS_DDP = 2, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CountAllReduces(TrainerCallback):
    """Counts the gradient all-reduces of each optimizer step with a DDP comm hook (the tiny
    model is one bucket: one call per all-reducing backward)."""

    def __init__(self, trainer: SharpnessAwareTrainer) -> None:
        self.trainer = trainer
        self.calls = 0
        self.per_step: list[int] = []

    # No annotations: DDP checks them against its own types.
    def hook(self, state, bucket):
        self.calls += 1
        return default_hooks.allreduce_hook(state, bucket)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.model_wrapped.register_comm_hook(None, self.hook)  # the Trainer's DDP

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.per_step.append(self.calls)
        self.calls = 0


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One torchrun worker: the environment torchrun sets, then an ordinary HF script."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    for ascent in ("local", "global"):
        for accumulate in (1, 2):  # micro-batches of 4 // accumulate: the same global batch
            with tempfile.TemporaryDirectory() as output_dir:
                args = arguments(
                    output_dir,
                    ddp_backend="gloo",
                    ddp_find_unused_parameters=False,
                    max_steps=STEPS_DDP,
                    per_device_train_batch_size=BATCH // accumulate,
                    gradient_accumulation_steps=accumulate,
                )
                trainer = SharpnessAwareTrainer(
                    model=Net(),
                    args=args,
                    train_dataset=Data(),
                    sharpness_aware=SharpnessAwareArguments(rho=RHO, ascent=ascent),
                )
                counter = CountAllReduces(trainer)
                trainer.add_callback(counter)
                trainer.train()
            result[ascent, accumulate] = {
                "wrapper": type(trainer.model_wrapped).__name__,
                "all_reduces": counter.per_step,
                "weights": snapshot(trainer.model),
            }
    torch.save(result, Path(out) / f"{rank}.pt")
    # No worker leaves while a peer still has collectives in flight (gloo would abort it).
    torch.distributed.barrier()


def worker_samples(step: int, rank: int, accumulate: int) -> list[int]:
    """The samples worker ``rank`` trains on at ``step``: accelerate deals the sampler's batches
    (of ``BATCH // accumulate``, in order) to the workers in turn."""
    size = BATCH // accumulate
    first = WORLD * BATCH * step
    return [
        first + size * (WORLD * micro + rank) + i
        for micro in range(accumulate)
        for i in range(size)
    ]


def local_ascent_loop(model: Net, data: Data, accumulate: int) -> dict[str, Tensor]:
    """``ascent="local"`` by hand: each worker perturbs with the gradient of its own samples
    (:func:`worker_samples`; its micro-batches are equal, so their mean loss is the mean over
    the samples); the base steps with the mean of the workers' descent gradients, clipped, with
    HF's AdamW and linear decay."""
    base = adamw()(model)
    opt = GCSAM(None, base, rho=RHO)
    schedule = torch.optim.lr_scheduler.LambdaLR(base, lambda t: (STEPS_DDP - t) / STEPS_DDP)
    for step in range(STEPS_DDP):
        descent = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(WORLD):
            batch = data.take(worker_samples(step, rank, accumulate))
            model(**batch)["loss"].backward()
            opt.first_step(zero_grad=True)  # w + eps_rank
            model(**batch)["loss"].backward()
            for total, p in zip(descent, model.parameters(), strict=True):
                total += p.grad / WORLD
            opt.restore()
            opt.zero_grad()
        for p, grad in zip(model.parameters(), descent, strict=True):
            p.grad = grad
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        base.step()
        schedule.step()
        opt.zero_grad()
    return snapshot(model)


def test_ddp_all_reduces_once_or_twice_and_steps_like_the_references(tmp_path: Path) -> None:
    """Two gloo workers with torchrun's variables and ``use_cpu=True, ddp_backend="gloo"``: one
    gradient all-reduce per optimizer step for ``ascent="local"``, two for ``"global"``, with
    and without accumulation (2 micro-batches per worker); the workers agree; ``"global"`` is
    one process on the global batch of 8, ``"local"`` the per-worker perturbation written out
    by hand (with accumulation, each worker's window holds other samples)."""
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    for ascent, all_reduces in (("local", 1), ("global", 2)):
        for accumulate in (1, 2):
            run = (ascent, accumulate)
            for result in results:
                assert result[run]["wrapper"] == "DistributedDataParallel"
                assert result[run]["all_reduces"] == [all_reduces] * STEPS_DDP, run
            assert_same(results[1][run]["weights"], results[0][run]["weights"])
    # The global batch is samples 8t..8t+7 however the workers split it.
    one_process = hand_loop(Net(), windows_of(Data(), [[WORLD * BATCH]] * STEPS_DDP))
    for accumulate in (1, 2):
        global_weights = results[0]["global", accumulate]["weights"]
        assert_same(global_weights, one_process["weights"][-1], atol=1e-6)
        local_weights = results[0]["local", accumulate]["weights"]
        assert_same(local_weights, local_ascent_loop(Net(), Data(), accumulate), atol=1e-6)


# Refused settings, before any weight changes ------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("rho", -0.1, ValueError, "rho must be a finite non-negative number"),
        ("rho", math.nan, ValueError, "rho must be a finite non-negative number"),
        ("method", "asam", ValueError, "method must be one of gcsam, sam"),
        ("adaptive", "yes", TypeError, "adaptive must be True or False"),
        ("p", 1, ValueError, "p must be 2 or float"),
        ("normalize_by", "mean", ValueError, "normalize_by must be 'centralized'"),
        ("gc_scope", "linear", ValueError, "gc_scope"),
        ("gc_descent", 1, TypeError, "gc_descent must be True or False"),
        ("ascent", "both", ValueError, "ascent must be 'local'"),
        ("mode", "sometimes", ValueError, "mode must be None"),
    ],
)
def test_bad_arguments_name_the_field(field: str, value: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=f"^SharpnessAwareArguments: {match}"):
        SharpnessAwareArguments(**{field: value})


@pytest.mark.parametrize("field", ["gc_scope", "gc_descent"])
def test_gcsam_settings_with_sam_are_refused(field: str) -> None:
    value = {"gc_scope": "conv", "gc_descent": True}[field]
    with pytest.raises(ValueError, match="GCSAM settings"):
        SharpnessAwareArguments(method="sam", **{field: value})


def deepspeed_arguments(output_dir: Path) -> TrainingArguments:
    args = arguments(output_dir)
    # TrainingArguments(deepspeed=...) needs the deepspeed package; the trainer reads the field.
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    return args


@pytest.mark.parametrize(
    ("make_args", "match"),
    [
        (lambda out: arguments(out, fsdp=True), "does not support FSDP"),
        (deepspeed_arguments, "does not support DeepSpeed"),
        (lambda out: arguments(out, optim="lomo"), "optim='lomo' updates the weights inside"),
        (lambda out: arguments(out, optim="galore_adamw_layerwise"), "inside backward"),
    ],
    ids=["fsdp", "deepspeed", "lomo", "layerwise"],
)
def test_sharded_and_in_backward_training_is_refused(
    tmp_path: Path, make_args: Callable[[Path], TrainingArguments], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SharpnessAwareTrainer(model=Net(), args=make_args(tmp_path), train_dataset=Data())


class Rebuilding(torch.optim.SGD):
    """An SGD whose ``param_groups`` is a new list at each access, as optimizer wrappers that
    assemble it from inner optimizers have it."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return list(self._groups)

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self._groups = groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # checks it, and appends it to a copy
        self._groups.append(param_group)


def assert_refused_at_train(
    tmp_path: Path, match: str, error: type = ValueError, **trainer_kwargs: Any
) -> None:
    model = trainer_kwargs.pop("model", None) or Net()
    before = snapshot(model)
    trainer = SharpnessAwareTrainer(
        model=model,
        args=trainer_kwargs.pop("args", None) or arguments(tmp_path),
        train_dataset=Data(),
        **trainer_kwargs,
    )
    with pytest.raises(error, match=match):
        trainer.train()
    assert_same(snapshot(model), before)


def test_an_optimizer_whose_groups_cannot_be_shared_is_refused(tmp_path: Path) -> None:
    model = Net()
    assert_refused_at_train(
        tmp_path,
        r"param_groups is a new list at each access",
        RuntimeError,
        model=model,
        optimizers=(Rebuilding(model.parameters(), lr=LR), None),
    )


def test_an_optimizer_over_other_tensors_is_refused(tmp_path: Path) -> None:
    dummy = nn.Parameter(torch.zeros(3))  # as layer-wise optimizers hold
    assert_refused_at_train(
        tmp_path,
        r"holds 1 tensor\(s\) that are not parameters of the model",
        optimizers=(torch.optim.AdamW([dummy], lr=LR), None),
    )


def test_momentum_ascent_without_momentum_is_refused(tmp_path: Path) -> None:
    assert_refused_at_train(
        tmp_path,
        "MomentumAscent perturbs along the base optimizer's momentum",
        args=arguments(tmp_path, optim="sgd"),
        sharpness_aware=SharpnessAwareArguments(mode="momentum"),
    )


def test_an_optimizer_and_arguments_for_another_are_refused(tmp_path: Path) -> None:
    model = Net()
    opt = GCSAM(model.parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="pass one of them"):
        SharpnessAwareTrainer(
            model=model,
            args=arguments(tmp_path),
            optimizers=(opt, None),
            sharpness_aware=SharpnessAwareArguments(),
        )
    with pytest.raises(TypeError, match="must be a SharpnessAwareArguments"):
        SharpnessAwareTrainer(model=model, args=arguments(tmp_path), sharpness_aware={"rho": 1})
