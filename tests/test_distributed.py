"""GCSAM under DistributedDataParallel: real worker processes on the CPU (gloo, loopback).

Each spawned test starts 2 workers (``torch.multiprocessing.spawn``) that run one scenario and
save their results; the checks run here, against references computed in this process:

* ``ascent="global"`` == one process on the concatenated batch (GCSAM itself);
* ``ascent="local"`` == a hand-written simulation where each half-batch perturbs with its own
  centralized gradient and the descent gradients at the ``w + eps_i`` are averaged;
* gradient all-reduces per step, counted by a DDP comm hook (the model is one bucket), with and
  without accumulation, in closure and two-step style;
* a failed second pass leaves every worker at ``w``; BatchNorm and GradScaler in both modes; a
  non-finite ascent gradient on one worker skips the step on every worker.

The spawned tests are marked ``slow`` (about 10 s each); the checks at the end run in-process.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from reference import centralize
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gcsam import GCSAM

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2
HALF = 6  # samples per worker per step; 3 micro-batches of 2
STEPS = 4
RHO, LR, MOMENTUM = 0.2, 0.1, 0.9
ATOL = 1e-5
MODES = ("local", "global")


# Models, data and one worker's step -----------------------------------------------------------


def make_net(bn: bool = False, seed: int = 0) -> nn.Module:
    """A conv + linear classifier small enough to be one DDP bucket."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(2, 4, 3)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def batch(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``: worker ``r`` takes samples ``[r * HALF, (r + 1) * HALF)``."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * HALF, 2, 6, 6, generator=gen), torch.randint(
        0, 3, (WORLD * HALF,), generator=gen
    )


def half(step: int, rank: int) -> tuple[Tensor, Tensor]:
    x, y = batch(step)
    return x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]


def make_opt(net: nn.Module, **kwargs: Any) -> GCSAM:
    return GCSAM(net.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, **kwargs)


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def accumulate(opt: GCSAM, ddp: nn.Module, data: tuple[Tensor, Tensor], micro: int) -> Tensor:
    """Forward + backward of one pass over ``micro`` micro-batches; the summed mean loss."""
    total = torch.zeros(())
    for i, (xb, yb) in enumerate(zip(data[0].chunk(micro), data[1].chunk(micro), strict=True)):
        with opt.micro_batch(last=i == micro - 1):
            loss = F.cross_entropy(ddp(xb), yb) / micro
            loss.backward()
        total += loss.detach()
    return total


def train_step(opt: GCSAM, ddp: nn.Module, data: tuple[Tensor, Tensor], style: str, micro: int):
    """One GCSAM step; with ``micro == 1`` the passes are written without ``micro_batch``."""
    if style == "closure":

        def closure() -> Tensor:
            opt.zero_grad()
            if micro > 1:
                return accumulate(opt, ddp, data, micro)
            loss = F.cross_entropy(ddp(data[0]), data[1])
            loss.backward()  # step() alone keeps the local ascent off the all-reduce
            return loss

        opt.step(closure)
    else:
        if micro == 1:
            with opt.ascent_pass():
                F.cross_entropy(ddp(data[0]), data[1]).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(ddp(data[0]), data[1]).backward()
        else:
            accumulate(opt, ddp, data, micro)
            opt.first_step(zero_grad=True)
            accumulate(opt, ddp, data, micro)
        opt.second_step(zero_grad=True)


# Spawning ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),  # a hang fails the test instead of stalling it
    )
    try:
        result = SCENARIOS[scenario](rank)
        torch.save(result, Path(out) / f"{rank}.pt")
        # No worker tears its process group down while a peer still has work in flight:
        # gloo aborts the process ("terminate called without an active exception") if one does.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's shutdown: under load, gloo's threads can still be joinable
    # when C++ statics are destroyed, and the process then aborts after its work is done and
    # saved ("terminate called without an active exception", seen in CI).
    os._exit(0)


def spawn(scenario: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``WORLD`` worker processes; their results, by rank."""
    mp.spawn(_worker, args=(free_port(), scenario, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]


def assert_close(actual: list[Tensor], expected: list[Tensor], atol: float = ATOL) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)


def wrap(model: nn.Module) -> DistributedDataParallel:
    return DistributedDataParallel(model)


# Scenarios (run in every worker) ------------------------------------------------------------------


def scenario_train(rank: int) -> dict[str, Any]:
    """STEPS closure steps in each mode, without and with BatchNorm, without and with a
    GradScaler (fp32 compute: power-of-two scales are exact)."""
    result: dict[str, Any] = {}
    for mode in MODES:
        for bn in (False, True):
            for scaled in (False, True):
                ddp = wrap(make_net(bn))
                opt = make_opt(ddp, model=ddp, ascent=mode)
                scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
                for step in range(STEPS):
                    x, y = half(step, rank)

                    def closure(opt=opt, ddp=ddp, scaler=scaler, x=x, y=y) -> Tensor:
                        opt.zero_grad()
                        loss = F.cross_entropy(ddp(x), y)
                        (loss if scaler is None else scaler.scale(loss)).backward()
                        return loss

                    opt.step(closure, scaler=scaler)
                    if scaler is not None:
                        scaler.update()
                result[mode, bn, scaled] = weights(ddp.module)
    return result


class CountingHook:
    """``hook`` is a DDP comm hook: the default all-reduce, counted (calls, buckets, bytes)."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.bucket_sizes: set[tuple[int, int]] = set()  # (bucket index, parameters in it)

    # No annotations: DDP checks them against the real classes, and they are strings here.
    def hook(self, state, bucket):
        self.calls += 1
        buffer = bucket.buffer()
        self.bytes += buffer.numel() * buffer.element_size()
        self.bucket_sizes.add((bucket.index(), len(bucket.parameters())))
        return default_hooks.allreduce_hook(state, bucket)


def scenario_counts(rank: int) -> dict[str, Any]:
    """All-reduces per step for every mode, style and number of micro-batches."""
    result: dict[str, Any] = {}
    for mode in MODES:
        for style in ("closure", "two_step"):
            for micro in (1, 3):
                ddp = wrap(make_net())
                hook = CountingHook()
                ddp.register_comm_hook(None, hook.hook)
                opt = make_opt(ddp, model=ddp, ascent=mode)
                per_step = []
                for step in range(STEPS):
                    before = hook.calls
                    train_step(opt, ddp, half(step, rank), style, micro)
                    per_step.append(hook.calls - before)
                result[mode, style, micro] = {
                    "per_step": per_step,
                    "buckets": hook.bucket_sizes,
                    "weights": weights(ddp.module),
                }
    return result


def scenario_failure(rank: int) -> dict[str, Any]:
    """A second pass that raises, in closure and in two-step style, then a normal step."""
    result: dict[str, Any] = {}
    for mode in MODES:
        ddp = wrap(make_net())
        opt = make_opt(ddp, model=ddp, ascent=mode)
        train_step(opt, ddp, half(0, rank), "closure", 1)
        w = weights(ddp.module)
        seen: dict[str, list[Tensor]] = {}
        calls = [0]

        def closure(opt=opt, ddp=ddp, seen=seen, calls=calls) -> Tensor:
            calls[0] += 1
            if calls[0] == 2:
                seen["perturbed"] = weights(ddp.module)
                raise RuntimeError("data loader failed")
            opt.zero_grad()
            loss = F.cross_entropy(ddp(half(1, rank)[0]), half(1, rank)[1])
            loss.backward()
            return loss

        with contextlib.suppress(RuntimeError):
            opt.step(closure)
        after_closure = weights(ddp.module)

        with opt.ascent_pass():
            F.cross_entropy(ddp(half(1, rank)[0]), half(1, rank)[1]).backward()
        opt.first_step(zero_grad=True)
        try:
            raise RuntimeError("second forward failed")
        except RuntimeError:
            opt.restore()
        after_two_step = weights(ddp.module)

        train_step(opt, ddp, half(1, rank), "two_step", 3)  # both passes still work
        result[mode] = {
            "w": w,
            "perturbed": seen["perturbed"],
            "after_closure": after_closure,
            "after_two_step": after_two_step,
            "still_perturbed": opt.perturbed,
            "final": weights(ddp.module),
        }
    return result


def scenario_nonfinite(rank: int) -> dict[str, Any]:
    """Step 1's ascent loss is infinite on worker 1 only (its descent pass is fine)."""
    result: dict[str, Any] = {}
    for mode in MODES:
        for scaled in (False, True):
            ddp = wrap(make_net())
            opt = make_opt(ddp, model=ddp, ascent=mode)
            scaler = (
                torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
                if scaled
                else None
            )
            history, scales, warned = [], [], []
            for step in range(3):
                calls = [0]

                def closure(ddp=ddp, opt=opt, scaler=scaler, step=step, calls=calls) -> Tensor:
                    calls[0] += 1
                    opt.zero_grad()
                    loss = F.cross_entropy(ddp(half(step, rank)[0]), half(step, rank)[1])
                    if step == 1 and rank == 1 and calls[0] == 1:
                        loss = loss * math.inf
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    return loss

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    opt.step(closure, scaler=scaler)
                warned.append([str(w.message) for w in caught if "GCSAM" in str(w.message)])
                if scaler is not None:
                    scaler.update()
                    scales.append(scaler.get_scale())
                history.append(weights(ddp.module))
            result[mode, scaled] = {
                "history": history,
                "scales": scales,
                "warned": warned,
            }
    return result


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "train": scenario_train,
    "counts": scenario_counts,
    "failure": scenario_failure,
    "nonfinite": scenario_nonfinite,
}


# References (this process) ---------------------------------------------------------------------


def single_process_gcsam(steps: int = STEPS) -> list[Tensor]:
    """GCSAM in one process on the concatenated batch (the mean loss over both halves)."""
    model = make_net()
    opt = make_opt(model)
    for step in range(steps):
        x, y = batch(step)

        def closure(x=x, y=y) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return weights(model)


def gradient_at(model: nn.Module, point: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """The cross-entropy gradient of ``model`` on ``(x, y)`` with its weights set to ``point``."""
    params = list(model.parameters())
    with torch.no_grad():
        for p, v in zip(params, point, strict=True):
            p.copy_(v)
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), params))


def ascent_point(w: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """``w + RHO GC(g) / ||GC(g)||``, the norm over every tensor, in float64."""
    d = [centralize(g) for g in grads]
    norm = torch.sqrt(sum(t.double().pow(2).sum() for t in d)).item()
    return [a + RHO * t / norm for a, t in zip(w, d, strict=True)]


def simulate(mode: str, bn: bool, steps: int = STEPS) -> list[Tensor]:
    """The DDP step written out by hand, one half-batch (worker) at a time.

    local: ``d = mean_i grad_i(w + eps_i)``, ``eps_i`` from worker i's own GC'd gradient;
    global: ``d = mean_i grad_i(w + eps)``, ``eps`` from the mean gradient. Per-half forwards
    keep BatchNorm's batch statistics per worker, as DDP does.
    """
    model = make_net(bn)
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)

    def grad_at(point: list[Tensor], rank: int, step: int) -> list[Tensor]:
        return gradient_at(model, point, *half(step, rank))

    def mean(per_rank: list[list[Tensor]]) -> list[Tensor]:
        return [torch.stack(ts).mean(0) for ts in zip(*per_rank, strict=True)]

    for step in range(steps):
        w = weights(model)
        ranks = range(WORLD)
        if mode == "global":
            shifted = ascent_point(w, mean([grad_at(w, r, step) for r in ranks]))
            descent = mean([grad_at(shifted, r, step) for r in ranks])
        else:
            descent = mean([grad_at(ascent_point(w, grad_at(w, r, step)), r, step) for r in ranks])
        with torch.no_grad():
            for p, v, g in zip(params, w, descent, strict=True):
                p.copy_(v)
                p.grad = g
        base.step()
    return weights(model)


# Tests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn("train", tmp_path_factory.mktemp("train"))


@pytest.mark.slow  # worker processes
def test_global_ascent_equals_one_process_on_the_whole_batch(trained) -> None:
    expected = single_process_gcsam()
    for rank in range(WORLD):
        assert_close(trained[rank]["global", False, False], expected)
    assert not torch.allclose(expected[0], make_net()[0].weight)  # it trained


@pytest.mark.slow  # worker processes
def test_local_ascent_equals_per_worker_perturbation(trained) -> None:
    expected = simulate("local", bn=False)
    for rank in range(WORLD):
        assert_close(trained[rank]["local", False, False], expected)
    # The two modes really differ at this tolerance.
    global_ = trained[0]["global", False, False]
    assert max((a - b).abs().max().item() for a, b in zip(expected, global_, strict=True)) > 1e-3


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad_scaler"])
def test_batchnorm_and_grad_scaler(trained, mode: str, bn: bool, scaled: bool) -> None:
    expected = simulate(mode, bn=bn)
    for rank in range(WORLD):
        assert_close(trained[rank][mode, bn, scaled], expected)


@pytest.mark.slow  # worker processes
def test_one_descent_allreduce_per_step_even_with_accumulation(tmp_path: Path) -> None:
    results = spawn("counts", tmp_path)
    n_params = len(list(make_net().parameters()))
    for rank in range(WORLD):
        for (mode, style, micro), run in results[rank].items():
            # one bucket holding every parameter: hook calls == all-reduces
            assert run["buckets"] == {(0, n_params)}, (mode, style, micro)
            expected = 1 if mode == "local" else 2
            assert run["per_step"] == [expected] * STEPS, (mode, style, micro, rank)
    for mode in MODES:
        reference = results[0][mode, "closure", 1]["weights"]
        assert_close(reference, simulate(mode, bn=False))
        for rank in range(WORLD):
            for style in ("closure", "two_step"):
                for micro in (1, 3):
                    assert_close(results[rank][mode, style, micro]["weights"], reference)


@pytest.mark.slow  # worker processes
def test_failed_second_pass_leaves_every_worker_at_w(tmp_path: Path) -> None:
    results = spawn("failure", tmp_path)
    for mode in MODES:
        for rank in range(WORLD):
            run = results[rank][mode]
            for key in ("after_closure", "after_two_step"):
                for a, w in zip(run[key], run["w"], strict=True):
                    assert torch.equal(a, w), (mode, rank, key)
            assert not run["still_perturbed"]
            assert any(
                not torch.equal(a, w) for a, w in zip(run["perturbed"], run["w"], strict=True)
            )
        same_eps = all(
            torch.equal(a, b)
            for a, b in zip(
                results[0][mode]["perturbed"], results[1][mode]["perturbed"], strict=True
            )
        )
        # local: each worker at its own w + eps_i; global: one shared perturbation
        assert same_eps == (mode == "global"), mode
        assert_close(results[0][mode]["final"], results[1][mode]["final"], atol=0)
        assert_close(results[0][mode]["w"], results[1][mode]["w"], atol=0)


@pytest.mark.slow  # worker processes
def test_nonfinite_ascent_on_one_worker_skips_the_step_on_every_worker(tmp_path: Path) -> None:
    results = spawn("nonfinite", tmp_path)
    for mode in MODES:
        for scaled in (False, True):
            runs = [results[rank][mode, scaled] for rank in range(WORLD)]
            for rank, run in enumerate(runs):
                before, after = run["history"][0], run["history"][1]
                assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (
                    mode,
                    scaled,
                    rank,
                )
                assert not torch.equal(run["history"][2][0], after[0])  # step 2 trains again
                warned = run["warned"][1]
                assert run["warned"][0] == run["warned"][2] == []
                if scaled:
                    assert warned == []
                elif mode == "local":
                    assert len(warned) == 1 and "on 1 of 2 DDP workers" in warned[0], warned
                else:
                    assert len(warned) == 1, warned  # identical all-reduced gradients
            for a, b in zip(runs[0]["history"], runs[1]["history"], strict=True):
                assert_close(a, b, atol=0)
            # the scalers back off together (and grow together on the good steps)
            assert runs[0]["scales"] == runs[1]["scales"]
            if scaled:
                assert runs[0]["scales"][1] == runs[0]["scales"][0] / 2


# Without processes ------------------------------------------------------------------------------


@pytest.mark.parametrize("ascent", ["Local", "sync", "", None, 1, "none"])
def test_bad_ascent(ascent: object) -> None:
    with pytest.raises(ValueError, match=r"ascent.*'local'.*'global'"):
        make_opt(make_net(), ascent=ascent)


@pytest.mark.parametrize("model", [object(), "ddp", [nn.Linear(2, 2)]])
def test_model_must_be_a_module(model: object) -> None:
    with pytest.raises(TypeError, match="model"):
        make_opt(make_net(), model=model)


@pytest.mark.parametrize("mode", MODES)
def test_without_ddp_the_settings_change_nothing(mode: str) -> None:
    plain, with_model = make_net(), make_net()
    opt_plain = make_opt(plain)
    opt_model = make_opt(with_model, model=with_model, ascent=mode)
    for step in range(2):
        train_step(opt_plain, plain, half(step, 0), "closure", 1)
        train_step(opt_model, with_model, half(step, 0), "two_step", 3)
    assert_close(weights(with_model), weights(plain), atol=1e-6)
    # the state dict keeps its format: ascent and model are constructor settings
    state, reference = opt_model.state_dict(), opt_plain.state_dict()
    assert state["param_groups"] == reference["param_groups"]
    assert "ascent" not in state["param_groups"][0]


def test_ascent_pass_refuses_the_descent_pass() -> None:
    model = make_net()
    opt = make_opt(model, model=model)
    F.cross_entropy(model(half(0, 0)[0]), half(0, 0)[1]).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="ascent_pass"):
        opt.ascent_pass()
    opt.restore()
    with opt.ascent_pass():  # a new step may begin
        pass
