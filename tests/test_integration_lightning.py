"""``gcsam.integrations.lightning`` against hand-written loops with the same seed and batches.

Every Lightning run here is checked against an independent loop over the same batches:
``GCSAM.step(closure)`` with BatchNorm frozen in the descent pass (the library's own step, not
the integration's), under the same autocast and GradScaler; DDP runs against a hand-written DDP
loop in the same two gloo workers, with the gradient all-reduces counted by a comm hook.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from gcsam import GCSAM, SAM, AscentFraction, Periodic, frozen_bn_stats  # noqa: E402
from gcsam.integrations.lightning import SharpnessAware, sharpness_aware_step  # noqa: E402

# Whole (tiny) training runs through the framework's Trainer: `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

RHO, LR, MOMENTUM = 0.2, 0.1, 0.9
BATCH = 4


def make_net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(2, 4, 3)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)]
    return nn.Sequential(*layers)


def dataset(n: int = 20) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, 2, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    )


def loader(n: int = 20, batch_size: int = BATCH) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


def gcsam_sgd(params: Iterable[Tensor], **kwargs: Any) -> GCSAM:
    return GCSAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, **kwargs)


class Classifier(pl.LightningModule):
    """A LightningModule the way the README shows it; ``configure`` returns what
    ``configure_optimizers`` should (the optimizer, or Lightning's dict with schedulers)."""

    def __init__(
        self,
        bn: bool = False,
        configure: Callable[[Iterable[Tensor]], Any] = gcsam_sgd,
        automatic: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = automatic
        self.net = make_net(bn)
        self.configure = configure
        self.optimizer_hooks = 0

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            return self.loss(batch)
        loss = sharpness_aware_step(self, batch, self.loss)
        if loss is not None:
            self.log("train_loss", loss, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer_hooks += 1

    def configure_optimizers(self) -> Any:
        return self.configure(self.parameters())


def fit(
    module: Classifier,
    data: DataLoader | None = None,
    callbacks: list[pl.Callback] | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(trainer_kwargs)
    trainer = pl.Trainer(
        callbacks=[SharpnessAware()] if callbacks is None else callbacks, **settings
    )
    trainer.fit(module, data if data is not None else loader(), ckpt_path=ckpt_path)
    return trainer


def hand_loop(
    net: nn.Module,
    opt: GCSAM | SAM,
    windows: Iterable[list[tuple[Tensor, Tensor]]],
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """The library's own step on each window of micro-batches (mean loss over the window),
    BatchNorm frozen in the descent pass; returns the number of steps."""
    steps = 0
    for window in windows:

        def closure(window: list[tuple[Tensor, Tensor]] = window) -> Tensor:
            opt.zero_grad()
            total = torch.zeros(())
            with frozen_bn_stats(net, enabled=opt.descending):
                for batch in window:
                    x, y = opt.pass_batch(batch)
                    with (
                        torch.autocast("cpu", dtype=autocast)
                        if autocast
                        else contextlib.nullcontext()
                    ):
                        loss = F.cross_entropy(net(x), y) / len(window)
                    (scaler.scale(loss) if scaler else loss).backward()
                    total += loss.detach().float()
            return total

        opt.step(closure, scaler=scaler)
        if scaler is not None:
            scaler.update()
        steps += 1
    return steps


def windows(data: DataLoader, size: int) -> list[list[tuple[Tensor, Tensor]]]:
    batches = list(data)
    return [batches[i : i + size] for i in range(0, len(batches), size)]


def assert_same_weights(module: nn.Module, reference: nn.Module, atol: float = 0.0) -> None:
    for (name, a), (_, b) in zip(
        module.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


# -- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("optimizer", [GCSAM, SAM])
def test_fp32_equals_the_librarys_own_step(bn: bool, optimizer: type) -> None:
    def configure(params: Iterable[Tensor]) -> Any:
        return optimizer(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    module = Classifier(bn=bn, configure=configure)
    trainer = fit(module)
    net = make_net(bn)
    steps = hand_loop(net, configure(net.parameters()), windows(loader(), 1))
    assert trainer.global_step == steps == 5
    assert module.optimizer_hooks == 5  # on_before_optimizer_step once per step
    assert_same_weights(module.net, net)
    if bn:  # statistics moved in the first pass only: once per step
        assert int(module.net[1].num_batches_tracked) == 5


def test_ascent_fraction_takes_its_first_pass_on_part_of_each_batch() -> None:
    """The callback hands each pass its part of the batch (``opt.pass_batch``): the same
    weights as the library's own step, and the first pass ran on half of each batch."""
    sizes: list[int] = []
    net = make_net(bn=True)
    net[0].register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    module = Classifier(bn=True, configure=lambda p: gcsam_sgd(p, mode=AscentFraction(0.5)))
    module.net = net
    fit(module)
    assert sizes == [BATCH // 2, BATCH] * 5
    reference = make_net(bn=True)
    hand_loop(reference, gcsam_sgd(reference.parameters(), mode="fraction"), windows(loader(), 1))
    assert_same_weights(module.net, reference)


def test_bf16_mixed_equals_the_same_autocast_by_hand() -> None:
    module = Classifier(bn=True)
    fit(module, precision="bf16-mixed")
    net = make_net(bn=True)
    hand_loop(net, gcsam_sgd(net.parameters()), windows(loader(), 1), autocast=torch.bfloat16)
    assert_same_weights(module.net, net)
    assert module.net[-1].weight.dtype == torch.float32


def fp16_plugin(init_scale: float = 2.0**10) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale))


def test_fp16_mixed_unscales_each_pass_like_the_scaler_by_hand() -> None:
    module = Classifier()
    plugin = fp16_plugin()
    fit(module, plugins=[plugin])
    net = make_net()
    scaler = torch.amp.GradScaler("cpu", 2.0**10)
    hand_loop(net, gcsam_sgd(net.parameters()), windows(loader(), 1), torch.float16, scaler)
    assert_same_weights(module.net, net)
    assert plugin.scaler.get_scale() == scaler.get_scale()


def test_fp16_overflow_skips_the_step_and_lowers_the_scale() -> None:
    module = Classifier()
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    plugin = fp16_plugin(init_scale=2.0**30)  # the fp16 backward overflows
    trainer = fit(module, loader(4), plugins=[plugin])
    assert trainer.global_step == 1  # counted, as Lightning counts a skipped AMP step
    assert_same_weights(module.net, _net_from(before))
    assert plugin.scaler.get_scale() == 2.0**29
    assert not module.optimizers().optimizer.descending  # no step left open


def _net_from(state: dict[str, Tensor]) -> nn.Module:
    net = make_net()
    net.load_state_dict(state)
    return net


def test_accumulation_equals_one_large_batch() -> None:
    module = Classifier()
    fit(module, loader(16, batch_size=2), [SharpnessAware(accumulate_grad_batches=2)])
    large = Classifier()
    fit(large, loader(16, batch_size=4))
    assert_same_weights(module.net, large.net, atol=1e-6)


def test_accumulation_keeps_a_shorter_last_window_and_returns_the_window_loss() -> None:
    losses: list[Tensor | None] = []

    class Recording(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
            losses.append(sharpness_aware_step(self, batch, self.loss))
            return losses[-1]

    module = Recording(bn=True)
    trainer = fit(module, callbacks=[SharpnessAware(accumulate_grad_batches=2)])
    net = make_net(bn=True)
    opt = gcsam_sgd(net.parameters())
    # 5 batches: windows of 2, 2 and 1
    steps = hand_loop(net, opt, windows(loader(), 2))
    assert trainer.global_step == steps == 3
    assert_same_weights(module.net, net, atol=1e-6)
    assert [loss is None for loss in losses] == [True, False, True, False, False]
    # the window's mean first-pass loss, at the weights the window started from
    first = make_net(bn=True)
    with torch.no_grad():
        want = sum(F.cross_entropy(first(x), y) for x, y in list(loader())[:2]) / 2
    torch.testing.assert_close(losses[1], want, rtol=0, atol=1e-6)


def test_clipping_applies_to_the_descent_gradient() -> None:
    for algorithm in ("norm", "value"):
        module = Classifier()
        fit(
            module,
            callbacks=[SharpnessAware(gradient_clip_val=0.05, gradient_clip_algorithm=algorithm)],
        )
        net = make_net()
        opt = gcsam_sgd(net.parameters())
        for x, y in loader():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(net(x), y).backward()
            assert opt.prepare_descent()
            if algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            else:
                torch.nn.utils.clip_grad_value_(net.parameters(), 0.05)
            opt.base_optimizer.step()
        assert_same_weights(module.net, net, atol=1e-7)
        unclipped = Classifier()
        fit(unclipped)
        assert not torch.allclose(unclipped.net[0].weight, module.net[0].weight)


def test_step_and_epoch_schedulers_step_like_automatic_optimization() -> None:
    lrs: list[float] = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def every_two_steps(params: Iterable[Tensor]) -> Any:
        opt = gcsam_sgd(params)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2},
        }

    fit(Classifier(configure=every_two_steps), callbacks=[SharpnessAware(), Recorder()])
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025]

    def per_epoch(params: Iterable[Tensor]) -> Any:
        opt = gcsam_sgd(params)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # left to the user
        return [opt], [{"scheduler": sched, "frequency": 2}, plateau]

    module = Classifier(configure=per_epoch)
    fit(module, max_epochs=5)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert module.trainer.lr_scheduler_configs[1].scheduler.last_epoch == 0

    module = Classifier(configure=every_two_steps)
    fit(module, callbacks=[SharpnessAware(step_schedulers=False)])
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_a_scheduler_stepped_twice_is_refused() -> None:
    class AlsoSteps(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
            loss = super().training_step(batch, batch_idx)
            self.lr_schedulers().step()  # what Lightning's manual optimization docs show
            return loss

    def configure(params: Iterable[Tensor]) -> Any:
        opt = gcsam_sgd(params)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    with pytest.raises(RuntimeError, match=r"stepped outside SharpnessAware too.*step_schedulers"):
        fit(AlsoSteps(configure=configure))


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    def configure(params: Iterable[Tensor]) -> Any:
        opt = gcsam_sgd(params, mode=Periodic(3))  # the step counter must survive the resume
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": sched}

    straight = Classifier(bn=True, configure=configure)
    fit(straight, max_epochs=4)
    first = Classifier(bn=True, configure=configure)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(first, callbacks=[SharpnessAware(), checkpoint], max_epochs=2, enable_checkpointing=True)
    resumed = Classifier(bn=True, configure=configure)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "resumed", save_last=True)  # as before
    trainer = fit(
        resumed,
        callbacks=[SharpnessAware(), checkpoint],
        max_epochs=4,
        enable_checkpointing=True,
        ckpt_path=str(tmp_path / "last.ckpt"),
    )
    assert trainer.global_step == 20
    assert_same_weights(resumed.net, straight.net)
    ours = resumed.trainer.optimizers[0].state_dict()
    theirs = straight.trainer.optimizers[0].state_dict()
    assert ours["sharpness_aware"]["steps"] == theirs["sharpness_aware"]["steps"] == 20
    for key, state in theirs["state"].items():
        torch.testing.assert_close(
            ours["state"][key]["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=0
        )
    assert (
        ours["param_groups"][0]["lr"]
        == theirs["param_groups"][0]["lr"]
        == pytest.approx(0.1 * 0.7**4)
    )


# -- bad input: a clear error before any weight changes -----------------------------------------


def assert_untouched(module: Classifier) -> None:
    assert_same_weights(module.net, make_net(bn=isinstance(module.net[1], nn.BatchNorm2d)))


class PlainManual(Classifier):
    """Lightning's manual optimization as its docs show it, without gcsam's callback: the
    closure, run in both passes, freezes BatchNorm in the second itself."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()

        def closure() -> Tensor:
            opt.zero_grad()
            with frozen_bn_stats(self.net, enabled=opt.optimizer.descending):
                loss = self.loss(batch)
            self.manual_backward(loss)
            return loss

        return opt.step(closure=closure)


@pytest.mark.parametrize(("precision", "bn"), [("32-true", False), ("32-true", True),
                                               ("bf16-mixed", True)])  # fmt: skip
def test_a_plain_manual_loop_trains_as_the_librarys_own_step(precision: str, bn: bool) -> None:
    """``opt.step(closure=closure)`` in a manual-optimization module: Lightning wraps that
    closure in the same ``functools.partial`` as its automatic one, so the optimizer tells them
    apart by what is wrapped; it refused this loop, naming automatic optimization."""
    module = PlainManual(bn=bn)
    trainer = fit(module, callbacks=[], precision=precision)
    net = make_net(bn)
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    steps = hand_loop(net, gcsam_sgd(net.parameters()), windows(loader(), 1), autocast=autocast)
    assert trainer.global_step == steps == 5
    assert_same_weights(module.net, net)


def test_a_manual_step_without_a_closure_is_refused_naming_the_closure() -> None:
    class NoClosure(Classifier):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            self.manual_backward(self.loss(batch))
            self.optimizers().step()

    module = NoClosure()
    with pytest.raises(TypeError, match="needs a closure"):
        fit(module, callbacks=[])
    assert_untouched(module)


def test_automatic_optimization_is_refused() -> None:
    module = Classifier(automatic=True)
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        fit(module)
    assert_untouched(module)


@pytest.mark.parametrize("fp16", [False, True])
def test_automatic_optimization_without_the_callback_is_refused_by_the_optimizer(
    fp16: bool,
) -> None:
    module = Classifier(automatic=True)
    plugins = [fp16_plugin()] if fp16 else []
    # fp16: Lightning's GradScaler calls step() without a closure
    error, match = (TypeError, "gcsam.integrations") if fp16 else (RuntimeError, "automatic")
    with pytest.raises(error, match=match):
        fit(module, callbacks=[], plugins=plugins)
    assert_untouched(module)


def test_a_step_without_the_callback_is_refused() -> None:
    module = Classifier()
    with pytest.raises(RuntimeError, match=r"exactly one SharpnessAware callback.*found 0"):
        fit(module, callbacks=[])
    assert_untouched(module)
    module = Classifier()
    with pytest.raises(RuntimeError, match="found 2"):
        fit(module, callbacks=[SharpnessAware(), SharpnessAware()])
    assert_untouched(module)


def test_an_optimizer_that_is_not_sharpness_aware_is_refused() -> None:
    module = Classifier(configure=lambda params: torch.optim.SGD(params, lr=LR))
    with pytest.raises(RuntimeError, match=r"one GCSAM or SAM optimizer.*got: SGD"):
        fit(module)
    assert_untouched(module)


def test_groups_no_longer_shared_with_the_base_are_refused() -> None:
    def unshared(params: Iterable[Tensor]) -> GCSAM:
        opt = gcsam_sgd(params)
        opt.base_optimizer.param_groups = list(opt.base_optimizer.param_groups)
        return opt

    module = Classifier(configure=unshared)
    with pytest.raises(RuntimeError, match="no longer shares its param_groups"):
        fit(module)
    assert_untouched(module)


def test_fp16_without_a_scaler_is_refused() -> None:
    plugin = fp16_plugin()
    plugin.scaler = None
    module = Classifier()
    with pytest.raises(RuntimeError, match="16-mixed' without a GradScaler"):
        fit(module, plugins=[plugin])
    assert_untouched(module)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"accumulate_grad_batches": 0}, ValueError, "accumulate_grad_batches must be >= 1"),
        ({"accumulate_grad_batches": 2.0}, TypeError, "accumulate_grad_batches must be an int"),
        ({"accumulate_grad_batches": True}, TypeError, "accumulate_grad_batches must be an int"),
        ({"gradient_clip_val": 0}, ValueError, "gradient_clip_val must be a finite number > 0"),
        ({"gradient_clip_val": float("inf")}, ValueError, "gradient_clip_val"),
        ({"gradient_clip_val": "1"}, ValueError, "gradient_clip_val"),
        ({"gradient_clip_algorithm": "l2"}, ValueError, "'norm' or 'value'"),
        ({"step_schedulers": 1}, TypeError, "step_schedulers must be True or False"),
    ],
)
def test_bad_callback_settings(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SharpnessAware(**kwargs)


# -- DDP: two gloo workers -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _CountAllReduces(pl.Callback):
    """Counts the DDP model's gradient all-reduces (one bucket: one per reduced pass)."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(state, bucket):
            self.count += 1
            return _all_reduce_mean(bucket)

        trainer.strategy.model.register_comm_hook(None, hook)


def _all_reduce_mean(bucket: Any) -> Any:
    import torch.distributed as dist

    tensor = bucket.buffer() / dist.get_world_size()
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _ddp_worker(
    rank: int, port: int, ascent: str, accumulate: int, out: str, plain: bool = False
) -> None:
    """One of two gloo workers: Lightning with gcsam's callback (or, ``plain``, a manual loop
    without it, whose passes DDP all-reduces both), then the same steps by hand."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    counter = _CountAllReduces()
    configure = lambda params: gcsam_sgd(params, ascent=ascent)  # noqa: E731
    module = PlainManual(configure=configure) if plain else Classifier(configure=configure)
    callbacks = [] if plain else [SharpnessAware(accumulate_grad_batches=accumulate)]
    trainer = fit(
        module,
        loader(16, batch_size=BATCH // accumulate),
        [counter, *callbacks],
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
    )
    # The same steps by hand on this worker's shard (Lightning's sampler for a training loader
    # under DDP: shuffled with seed 0, epoch 0), through a DDP model the optimizer knows.
    ddp = DistributedDataParallel(make_net())
    opt = gcsam_sgd(ddp.parameters(), model=ddp, ascent=ascent)
    shard = DataLoader(
        dataset(16),
        batch_size=BATCH,
        sampler=DistributedSampler(dataset(16), num_replicas=2, rank=rank, shuffle=True, seed=0),
    )
    for x, y in shard:

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            micro_batches = zip(x.chunk(accumulate), y.chunk(accumulate), strict=True)
            for index, (xs, ys) in enumerate(micro_batches):
                with opt.micro_batch(last=index == accumulate - 1):
                    (F.cross_entropy(ddp(xs), ys) / accumulate).backward()
            return torch.zeros(())

        opt.step(closure)
    torch.save(
        {
            "count": counter.count,
            "steps": trainer.global_step,
            "lightning": module.net.state_dict(),
            "hand": ddp.module.state_dict(),
        },
        Path(out) / f"{rank}.pt",
    )
    if dist.is_initialized():
        # Both ranks leave together: a rank that tears gloo down while its peer still talks to
        # it can abort the peer ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # as test_distributed's workers: no interpreter shutdown, where gloo can abort


@pytest.mark.parametrize(
    ("ascent", "accumulate", "all_reduces", "plain"),
    [("local", 1, 1, False), ("global", 1, 2, False), ("local", 2, 1, False),
     ("global", 1, 2, True)],
)  # fmt: skip
def test_ddp_all_reduces_per_step_and_weights(
    ascent: str, accumulate: int, all_reduces: int, plain: bool, tmp_path: Path
) -> None:
    """With the callback, and a plain manual loop (every pass all-reduced: the global ascent)."""
    args = (free_port(), ascent, accumulate, str(tmp_path), plain)
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for result in results:
        assert result["steps"] == 2  # 16 samples, 2 workers, 4 samples per worker and step
        assert result["count"] == all_reduces * result["steps"]
        for name, value in result["hand"].items():
            torch.testing.assert_close(result["lightning"][name], value, rtol=0, atol=1e-6)
    for name, value in results[0]["lightning"].items():  # the workers agree
        torch.testing.assert_close(results[1]["lightning"][name], value, rtol=0, atol=0)
