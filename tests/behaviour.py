"""Recorded behaviour of the optimizer: weights and state dicts after a few steps of every mode
x GCSAM/SAM x SGD/Adam x closure/two-step, with BatchNorm, GradScaler (fp16 autocast on CPU),
non-finite steps, the group settings, rho schedules, mode changes between steps, low-precision
weights, and the DDP and FSDP2 gloo paths.

``tests/fixtures/behaviour-<kind>.pt`` holds what one version of the library computed, and
``tests/test_behaviour.py`` checks that the current one computes the same, bit for bit. Record
again only to change behaviour on purpose (say so in the commit)::

    python tests/behaviour.py record            # every kind; minutes on 2 cores

Every run pins what the numbers depend on besides this library: one thread, ATen's baseline
CPU kernels, MKL's reproducible code path and no oneDNN (see :data:`PINNED_ENV`). That is not
quite enough: even pinned, torch's CPU ``sqrt`` (which Adam uses) is not correctly rounded, and
rounds differently on different kinds of x86-64 CPU. So each kind of CPU seen has its own
recording of the same library version, ``behaviour-<kind>.pt``, ``behaviour-<kind>.2.pt``
(made at 47668d4, on the CPU of a later CI machine), and the test passes on the one that matches.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from gcsam import (
    GCSAM,
    SAM,
    AdaptiveAscent,
    LookSAM,
    MomentumAscent,
    Periodic,
    ProportionalRho,
    frozen_bn_stats,
)

FIXTURES = Path(__file__).parent / "fixtures"
KINDS = ("single", "ddp", "fsdp")
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",  # ATen's kernels without AVX2/AVX-512 dispatch
    "MKL_CBWR": "COMPATIBLE",  # MKL's results independent of the CPU's instruction set
    "GLOO_SOCKET_IFNAME": "lo",
}
STEPS, HALF = 6, 3  # steps per run (state recorded after HALF); samples per worker
WORLD = 2

MODES: dict[str, Callable[[], Any]] = {
    "full": lambda: None,
    "periodic": lambda: Periodic(every=2),
    "looksam": lambda: LookSAM(every=2, alpha=0.7),
    "momentum": lambda: MomentumAscent(),
    "adaptive": lambda: AdaptiveAscent(decay=0.5, threshold=0.0),
}


def conv_bn_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)
    ).to(dtype)  # fmt: skip


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def batch(step: int, size: int = 8, conv: bool = True) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    shape = (size, 2, 5, 5) if conv else (size, 6)
    return torch.randn(*shape, generator=gen), torch.randint(0, 3, (size,), generator=gen)


def clone(value: Any) -> Any:
    """A deep copy with every tensor detached and cloned (DTensors as their full tensor)."""
    if isinstance(value, Tensor):
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: clone(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(clone(item) for item in value)
    return copy.deepcopy(value)


# One process -------------------------------------------------------------------------------


class Run:
    """A model, its optimizer and what steps with them (schedulers, a GradScaler)."""

    def __init__(self, scenario: dict[str, Any]) -> None:
        self.scenario = scenario
        self.model = conv_bn_net(scenario.get("dtype", torch.float32))
        self.opt = scenario["build"](self.model)
        self.scaler = (
            torch.amp.GradScaler("cpu", init_scale=2.0**8) if scenario.get("amp") else None
        )
        self.schedulers: list[Any] = []
        if scenario.get("scheduled"):
            self.schedulers = [
                torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=STEPS),
                ProportionalRho(self.opt, min_rho=0.01),
            ]

    def stateful(self) -> list[Any]:
        return [self.opt, *self.schedulers, *([self.scaler] if self.scaler else [])]

    def loss(self, step: int, first_pass: bool) -> Tensor:
        x, y = batch(step)
        x = x.to(self.scenario.get("dtype", torch.float32))
        with torch.autocast("cpu", dtype=torch.float16, enabled=self.scaler is not None):
            loss = F.cross_entropy(self.model(x).float(), y)
        if first_pass and step == self.scenario.get("nonfinite_at"):
            loss = loss * math.inf
        return loss

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, step: int) -> None:
        opt, scaler = self.opt, self.scaler
        swap = self.scenario.get("swap", {}).get(step, "keep")
        if swap != "keep":
            opt.mode = swap
        if self.scenario["style"] == "closure":
            calls = []

            def closure() -> Tensor:
                opt.zero_grad()
                with frozen_bn_stats(self.model, enabled=opt.descending):
                    loss = self.loss(step, first_pass=not calls)
                self.backward(loss)
                calls.append(1)
                return loss

            opt.step(closure, scaler=scaler)
        else:
            with opt.ascent_pass():
                self.backward(self.loss(step, first_pass=True))
            opt.first_step(zero_grad=True, scaler=scaler)
            if opt.descending:
                with frozen_bn_stats(self.model):
                    self.backward(self.loss(step, first_pass=False))
            opt.second_step(zero_grad=True, scaler=scaler)
        if scaler is not None:
            scaler.update()
        for scheduler in self.schedulers:
            scheduler.step()

    def train(self, steps: range) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite steps
            for step in steps:
                self.step(step)


def sgd(family: type, **kwargs: Any) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> Any:
        return family(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4, **kwargs
        )

    return build


def adam(family: type, **kwargs: Any) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> Any:
        return family(model.parameters(), torch.optim.Adam, lr=1e-2, **kwargs)

    return build


def per_group(mode: Any) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> Any:
        groups = [
            {"params": list(model[0].parameters()), "rho": 0.1, "gc_scope": "conv"},
            {"params": [*model[1].parameters(), *model[4].parameters()]},
        ]
        return GCSAM(groups, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, mode=mode)

    return build


def single_scenarios() -> dict[str, dict[str, Any]]:
    scenarios: dict[str, dict[str, Any]] = {}
    for family in (GCSAM, SAM):
        for base_name, base in (("sgd", sgd), ("adam", adam)):
            for mode, make_mode in MODES.items():
                for style in ("closure", "two_step"):
                    name = f"{family.__name__}-{base_name}-{mode}-{style}"
                    scenarios[name] = {
                        "build": base(family, rho=0.1, mode=make_mode()),
                        "style": style,
                    }
    extras: dict[str, tuple[tuple[str, ...], Callable[[str], dict[str, Any]]]] = {
        "amp": (tuple(MODES), lambda m: {"build": sgd(GCSAM, mode=MODES[m]()), "amp": True,
                                          "nonfinite_at": 1}),
        "nonfinite": (tuple(MODES), lambda m: {"build": sgd(GCSAM, mode=MODES[m]()),
                                               "nonfinite_at": 2}),
        "asam": (("full", "looksam"), lambda m: {"build": sgd(GCSAM, rho=0.5, adaptive=True,
                                                              mode=MODES[m]())}),
        "p-inf": (("full", "momentum"), lambda m: {"build": sgd(GCSAM, rho=0.01, p=math.inf,
                                                                mode=MODES[m]())}),
        "raw-gc-descent": (tuple(MODES), lambda m: {"build": sgd(GCSAM, normalize_by="raw",
                                                                 gc_descent=True,
                                                                 mode=MODES[m]())}),
        "per-group": (("full", "looksam", "adaptive"), lambda m: {"build": per_group(MODES[m]())}),
        "single-tensor": (tuple(MODES), lambda m: {"build": sgd(GCSAM, foreach=False,
                                                                mode=MODES[m]())}),
        "scheduled": (("full", "periodic"), lambda m: {"build": sgd(GCSAM, mode=MODES[m]()),
                                                       "scheduled": True}),
        "rho-zero": (tuple(MODES), lambda m: {"build": sgd(GCSAM, rho=0.0, mode=MODES[m]())}),
        "bf16-weights": (("full", "looksam", "momentum"), lambda m: {
            "build": sgd(GCSAM, mode=MODES[m]()), "dtype": torch.bfloat16}),
    }  # fmt: skip
    for extra, (modes, make) in extras.items():
        for mode in modes:
            for style in ("closure", "two_step"):
                scenarios[f"{extra}-{mode}-{style}"] = make(mode) | {"style": style}
    for style in ("closure", "two_step"):
        scenarios[f"swap-adaptive-threshold-{style}"] = {
            "build": sgd(GCSAM, mode=AdaptiveAscent(decay=0.5, threshold=1.0)),
            "swap": {2: AdaptiveAscent(decay=0.5, threshold=-1.0)},
            "style": style,
        }
        scenarios[f"swap-periodic-full-periodic-{style}"] = {
            "build": sgd(GCSAM, mode=Periodic(every=3)),
            "swap": {2: None, 3: Periodic(every=3)},
            "style": style,
        }
    return scenarios


def run_single() -> dict[str, Any]:
    """Per scenario: the model's state after HALF and STEPS steps, the states of the optimizer
    (and its schedulers and scaler) after HALF."""
    results = {}
    for name, scenario in single_scenarios().items():
        run = Run(scenario)
        run.train(range(HALF))
        middle = {"model": clone(run.model.state_dict()), "states": clone(
            [item.state_dict() for item in run.stateful()])}  # fmt: skip
        run.train(range(HALF, STEPS))
        results[name] = middle | {"final": clone(run.model.state_dict())}
    return results


def resume_single(recorded: dict[str, Any]) -> dict[str, Any]:
    """Per scenario: a fresh model and optimizer loaded with the recorded state after HALF
    steps, then the rest of the steps; the model's state at the end."""
    results = {}
    for name, scenario in single_scenarios().items():
        run = Run(scenario)
        for step, mode in sorted(scenario.get("swap", {}).items()):
            if step < HALF:  # the mode in force after HALF steps
                run.opt.mode = mode
        run.model.load_state_dict(recorded[name]["model"])
        for item, state in zip(run.stateful(), recorded[name]["states"], strict=True):
            item.load_state_dict(clone(state))
        run.train(range(HALF, STEPS))
        results[name] = clone(run.model.state_dict())
    return results


# Several processes -------------------------------------------------------------------------


def distributed_scenarios(kind: str) -> dict[str, dict[str, Any]]:
    if kind == "ddp":
        scenarios = {
            f"{mode}-{ascent}": {"mode": mode, "ascent": ascent}
            for ascent in ("local", "global")
            for mode in MODES
            if ascent == "global" or mode in ("full", "periodic", "momentum")
        }
        scenarios["nonfinite-on-one-rank-local"] = {"mode": "full", "ascent": "local",
                                                    "nan_at": (2, 1)}  # fmt: skip
        return scenarios
    scenarios = {mode: {"mode": mode} for mode in MODES}
    scenarios["adam-grad-scaler"] = {"mode": "full", "adam": True, "scaler": 2.0**10}
    scenarios["nonfinite-on-one-rank"] = {"mode": "full", "nan_at": (2, 1)}
    return scenarios


def _distributed_run(kind: str, rank: int, scenario: dict[str, Any]) -> dict[str, Any]:
    model: nn.Module
    if kind == "ddp":
        net = conv_bn_net()
        model = nn.parallel.DistributedDataParallel(net)
        options = {"model": model, "ascent": scenario["ascent"]}
    else:
        from torch.distributed.fsdp import fully_shard

        model = net = mlp()
        for layer in (net[0], net[2]):
            fully_shard(layer)
        fully_shard(net)
        options = {}
    mode = MODES[scenario["mode"]]()
    if scenario.get("adam"):
        opt = GCSAM(net.parameters(), torch.optim.Adam, rho=0.1, lr=1e-2, mode=mode, **options)
    else:
        opt = GCSAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                    mode=mode, **options)  # fmt: skip
    scale = scenario.get("scaler")
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    for step in range(STEPS):
        x, y = batch(step, WORLD * 4, conv=kind == "ddp")
        x, y = x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]
        calls: list[int] = []

        def closure(x: Tensor = x, y: Tensor = y, step: int = step, calls: list = calls) -> Tensor:
            opt.zero_grad()
            with frozen_bn_stats(net, enabled=opt.descending):
                loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            if (step, rank) == scenario.get("nan_at") and not calls:
                grad = next(net.parameters()).grad
                (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = math.nan
            calls.append(1)
            return loss

        opt.step(closure, scaler=scaler)
        if scaler is not None:
            scaler.update()
    return {"model": clone(net.state_dict()), "state": clone(opt.state_dict())}


def _worker(rank: int, port: int, kind: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite steps
            results = {
                name: _distributed_run(kind, rank, scenario)
                for name, scenario in distributed_scenarios(kind).items()
            }
        torch.save(results, Path(out) / f"{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(kind: str, out: Path) -> dict[str, Any]:
    """Per scenario and rank: the model's state dict and the optimizer's after STEPS steps."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, kind, str(out)), nprocs=WORLD, join=True)
    per_rank = [torch.load(out / f"{rank}.pt", weights_only=True) for rank in range(WORLD)]
    return {name: [ranks[name] for ranks in per_rank] for name in per_rank[0]}


# Entry points -------------------------------------------------------------------------------


def platform_key() -> dict[str, str]:
    """What the recorded numbers are valid for."""
    return {"torch": str(torch.__version__), "machine": platform.machine()}


def compute(kind: str, out: Path, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """What this checkout computes for ``kind``; with the ``recorded`` fixture of ``single``,
    also its runs resumed from the recorded states."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    if kind == "single":
        results: dict[str, Any] = {"runs": run_single()}
        if recorded is not None:
            results["resumed"] = resume_single(recorded["runs"])
    else:
        results = {"runs": run_distributed(kind, out)}
    return results | {"platform": platform_key()}


def in_pinned_process(kind: str, out: Path, recorded: Path | None = None) -> Path:
    """Run :func:`compute` in a fresh interpreter with :data:`PINNED_ENV`; the path of its
    results."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"behaviour-{kind}.pt"
    command = [sys.executable, __file__, "compute", kind, str(target)]
    if recorded is not None:
        command.append(str(recorded))
    env = os.environ | PINNED_ENV
    subprocess.run(command, check=True, env=env, timeout=600)
    return target


def main(argv: list[str]) -> None:
    if argv[0] == "record":
        for kind in argv[1:] or KINDS:
            with tempfile.TemporaryDirectory() as work:
                produced = in_pinned_process(kind, Path(work))
                shutil.move(produced, FIXTURES / produced.name)
            print(f"recorded {FIXTURES / produced.name}")
        return
    kind, target = argv[1], Path(argv[2])
    recorded = torch.load(argv[3], weights_only=True) if len(argv) > 3 else None
    torch.save(compute(kind, target.parent, recorded), target)


if __name__ == "__main__":
    main(sys.argv[1:])
