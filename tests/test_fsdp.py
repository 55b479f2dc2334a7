"""GCSAM on FSDP2 (``fully_shard``) parameters: 2 gloo workers against one process.

Every scenario trains a small model sharded with ``fully_shard`` on 2 workers (each worker half
of every batch; uneven dim-0 splits: 5 rows are 3 + 2) and the same model, unsharded, in this
process on the whole batch. FSDP2 reduce-scatters the gradients, so the ascent is global and the
two must agree: the norms are one all-reduce of the local squared terms, everything else works
on the local rows. One spawn runs every scenario (they share the process start-up); the checks
run here.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from gcsam import GCSAM, SAM, AdaptiveAscent, LookSAM, MomentumAscent, Periodic

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not dist.is_gloo_available():
    pytest.skip("FSDP2 (fully_shard) with gloo is not available", allow_module_level=True)

WORLD = 2
HALF = 4  # samples per worker and step
STEPS = 3
ATOL = 1e-6
# The workers' device: the CPU under gloo, their GPU under nccl (set in _worker); the references
# are computed here, on the CPU.
_DEVICE = torch.device("cpu")
BACKENDS = [
    pytest.param("gloo", id="gloo"),
    pytest.param(
        "nccl",
        id="nccl",
        marks=pytest.mark.skipif(
            not (dist.is_nccl_available() and torch.cuda.device_count() >= WORLD),
            reason=f"needs {WORLD} CUDA GPUs and nccl",
        ),
    ),
]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def conv_net() -> nn.Module:
    """4-D weights, a norm layer with weight and bias, and biases everywhere."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3), nn.GroupNorm(1, 5), nn.ReLU(), nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3), nn.LayerNorm(3),
    )  # fmt: skip


def batch(step: int, conv: bool) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    shape = (WORLD * HALF, 2, 4, 4) if conv else (WORLD * HALF, 6)
    return torch.randn(*shape, generator=gen), torch.randint(0, 3, (WORLD * HALF,), generator=gen)


def sgd(cls: type, **kwargs: Any) -> Callable[[Any], Any]:
    return lambda params: cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)


def per_group(model: nn.Module) -> GCSAM:
    first, last = list(model[0].parameters()), list(model[2].parameters())
    return GCSAM(
        [{"params": first, "rho": 0.3, "gc_scope": "all"}, {"params": last, "rho": 0.1}],
        torch.optim.SGD,
        lr=0.1,
        rho=0.2,
    )


def adam_sam(params: Any) -> SAM:
    return SAM(params, torch.optim.Adam, rho=0.1, lr=0.01)


# name: (model, optimizer from the parameters (or the model, for per-group), options)
SCENARIOS: dict[str, tuple[Callable[[], nn.Module], Callable[[Any], Any], dict[str, Any]]] = {
    "gcsam": (mlp, sgd(GCSAM, rho=0.2), {}),
    "gcsam-no-foreach": (mlp, sgd(GCSAM, rho=0.2, foreach=False), {}),
    "gcsam-kept-unsharded": (mlp, sgd(GCSAM, rho=0.2), {"reshard_after_forward": False}),
    "sam-adam": (mlp, adam_sam, {}),
    "asam": (mlp, sgd(GCSAM, rho=0.5, adaptive=True), {}),
    "p-inf": (mlp, sgd(GCSAM, rho=0.01, p=math.inf), {}),
    "raw-norm-gc-descent": (mlp, sgd(GCSAM, normalize_by="raw", gc_descent=True), {}),
    "per-group": (mlp, per_group, {"by_model": True}),
    "conv": (conv_net, sgd(GCSAM, rho=0.2), {"conv": True}),
    "periodic": (mlp, sgd(GCSAM, mode=Periodic(2)), {}),
    "looksam": (mlp, sgd(GCSAM, mode=LookSAM(2, alpha=0.5)), {}),
    "momentum": (mlp, sgd(GCSAM, mode=MomentumAscent()), {}),
    "adaptive": (mlp, sgd(GCSAM, mode=AdaptiveAscent(threshold=0.0)), {}),
    "hsdp": (mlp, sgd(GCSAM, rho=0.2), {"hsdp": True}),
    "grad-scaler": (mlp, adam_sam, {"scaler": 2.0**10}),
    "nonfinite-on-one-rank": (mlp, sgd(GCSAM, rho=0.2), {"nan_at": (1, 1)}),
}


def train(
    model: nn.Module,
    opt: Any,
    rank: int | None,
    conv: bool,
    nan_at: tuple[int, int] | None = None,
    steps: range = range(STEPS),
    scale: float | None = None,
) -> None:
    """``opt.step(closure)`` on each step's batch: its ``rank`` half under FSDP, all of it in
    one process (``rank=None``). ``nan_at=(step, rank)``: that rank's first-pass gradient of
    the first weight is NaN at that step. ``scale``: a GradScaler with this initial scale."""
    scaler = None if scale is None else torch.amp.GradScaler(_DEVICE.type, init_scale=scale)
    for step in steps:
        x, y = (t.to(_DEVICE) for t in batch(step, conv))
        if rank is not None:
            x, y = x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]

        def closure(
            x: Tensor = x,
            y: Tensor = y,
            step: int = step,
            calls: list[int] = [],  # noqa: B006
        ) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            calls.append(1)
            if nan_at is not None and (step, rank) == nan_at and len(calls) == 1:
                grad = next(model.parameters()).grad
                (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = math.nan
            return loss

        opt.step(closure, scaler=scaler)
        if scaler is not None:
            scaler.update()


def train_scenario(name: str, model: nn.Module, opt: Any, rank: int | None) -> None:
    """:func:`train` with the scenario's options."""
    options = SCENARIOS[name][2]
    train(
        model,
        opt,
        rank,
        options.get("conv", False),
        options.get("nan_at"),
        scale=options.get("scaler"),
    )


def full(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        for name, p in model.named_parameters()
    }


def shard(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    kwargs: dict[str, Any] = {}
    if options.get("hsdp"):  # (replicate, shard): placements (Replicate(), Shard(0))
        kwargs["mesh"] = init_device_mesh(_DEVICE.type, (1, WORLD), mesh_dim_names=("rep", "shard"))
    if "reshard_after_forward" in options:
        kwargs["reshard_after_forward"] = options["reshard_after_forward"]
    for layer in model:
        if any(True for _ in layer.parameters()):
            fsdp.fully_shard(layer, **kwargs)
    fsdp.fully_shard(model, **kwargs)
    return model


def make(name: str, sharded_rank: int | None) -> tuple[nn.Module, Any]:
    build, optimizer, options = SCENARIOS[name]
    model = build()
    if sharded_rank is not None:
        model = shard(model.to(_DEVICE), options)
    opt = optimizer(model if options.get("by_model") else model.parameters())
    return model, opt


# -- the workers -------------------------------------------------------------------------------


def _worker(rank: int, port: int, backend: str, out: str) -> None:
    global _DEVICE
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        _DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(_DEVICE)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    results: dict[str, Any] = {"backend": backend}
    for name in SCENARIOS:
        model, opt = make(name, rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_scenario(name, model, opt, rank)
        results[name] = {
            "weights": full(model),
            "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        }
        if name == "gcsam":
            results["backup"] = [
                (opt.state[p]["backup"].to_local().numel(), p.to_local().numel(), p.numel())
                for p in model.parameters()
            ]
    results["resume"] = _resume(rank)
    results["errors"] = _errors(rank)
    torch.save(results, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def _resume(rank: int) -> dict[str, Tensor]:
    """2 steps, the model and optimizer state through torch.distributed.checkpoint's state-dict
    helpers, a fresh model and optimizer loaded from them, 1 more step."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def periodic(params: Any) -> GCSAM:  # the mode's step count must survive
        return GCSAM(params, torch.optim.Adam, rho=0.2, lr=0.01, mode=Periodic(2))

    model = shard(mlp().to(_DEVICE), {})
    opt = periodic(model.parameters())
    train(model, opt, rank, conv=False, steps=range(2))
    saved_model = get_model_state_dict(model)
    saved_opt = get_optimizer_state_dict(model, opt)  # the helpers keep state and groups only
    saved_mode = opt.state_dict()["sharpness_aware"]
    fresh = shard(mlp().to(_DEVICE), {})
    fresh_opt = periodic(fresh.parameters())
    set_model_state_dict(fresh, saved_model)
    # A fresh optimizer has no state for the helper to fill in: it lets the base optimizer take
    # a step at lr 0 to make some, which a sharpness-aware one (no closure) cannot.
    set_optimizer_state_dict(fresh, fresh_opt.base_optimizer, saved_opt)
    # The base has new param groups now: share them again, with the mode's state.
    base = fresh_opt.base_optimizer.state_dict()
    fresh_opt.load_state_dict(base | {"sharpness_aware": saved_mode})
    train(fresh, fresh_opt, rank, conv=False, steps=range(2, STEPS))
    return full(fresh)


def _errors(rank: int) -> dict[str, str]:
    """What each bad setup raises, and whether the weights stayed where they were."""
    from torch.distributed.tensor import Shard, distribute_tensor

    found: dict[str, str] = {}
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(_DEVICE.type, (WORLD,))

    def attempt(key: str, params: list[Tensor], **kwargs: Any) -> None:
        before = [p.detach().clone() for p in params]
        opt = GCSAM(params, torch.optim.SGD, lr=0.1, **kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        try:
            opt.first_step()
        except ValueError as error:
            unchanged = all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
            found[key] = f"{'unchanged' if unchanged else 'CHANGED'}: {error}"

    torch.manual_seed(0)
    wide = nn.Parameter(distribute_tensor(torch.randn(4, 6, device=_DEVICE), mesh, [Shard(1)]))
    attempt("shard-1", [wide])
    model = shard(mlp().to(_DEVICE), {})
    attempt("mixed", [*model.parameters(), nn.Parameter(torch.randn(3, 2, device=_DEVICE))])
    named = nn.Module()
    named.wide = wide
    attempt("named", [wide], model=named)
    ddp = torch.nn.parallel.DistributedDataParallel(nn.Linear(2, 2).to(_DEVICE))
    attempt("ddp", list(model.parameters()), model=ddp)
    return found


@pytest.fixture(scope="module", params=BACKENDS)
def results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """Every worker's results, under gloo on the CPU and, with 2 GPUs, under nccl on them."""
    backend = request.param
    out = tmp_path_factory.mktemp(f"fsdp-{backend}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, backend, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"{rank}.pt", weights_only=True) for rank in range(WORLD)]


def reference(name: str) -> dict[str, Tensor]:
    model, opt = make(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_scenario(name, model, opt, None)
    return full(model)


def assert_weights(
    actual: dict[str, Tensor], expected: dict[str, Tensor], backend: str = "gloo"
) -> None:
    """Equal to float rounding: the CPU's, or a GPU's kernels against the CPU's (TF32 off)."""
    atol = ATOL if backend == "gloo" else 10 * ATOL
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, msg=name)


# -- the checks --------------------------------------------------------------------------------

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "nonfinite-on-one-rank"])
def test_fsdp2_equals_one_process(results: list[dict[str, Any]], name: str) -> None:
    expected = reference(name)
    for rank in range(WORLD):
        assert_weights(results[rank][name]["weights"], expected, results[rank]["backend"])
        assert results[rank][name]["warnings"] == []


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(
    results: list[dict[str, Any]],
) -> None:
    """Rank 1's gradient is NaN at step 1: the reduced norm is NaN on both ranks, so both skip
    that step (with the warning) and take steps 0 and 2, like one process that skips step 1."""
    model, opt = make("gcsam", None)
    train(model, opt, None, conv=False, steps=range(1))
    train(model, opt, None, conv=False, steps=range(2, STEPS))
    for rank in range(WORLD):
        result = results[rank]["nonfinite-on-one-rank"]
        assert_weights(result["weights"], full(model), results[rank]["backend"])
        assert len(result["warnings"]) == 1 and "not finite" in result["warnings"][0]


def test_the_backup_holds_the_local_shard_only(results: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        backup = results[rank]["backup"]
        assert [local for local, _, _ in backup] == [shard for _, shard, _ in backup]
        # the first layer's 5 x 6 weight: rows 3 + 2
        assert backup[0][0] == (3 if rank == 0 else 2) * 6
    totals = [sum(local for local, _, _ in results[rank]["backup"]) for rank in range(WORLD)]
    assert sum(totals) == sum(p.numel() for p in mlp().parameters())  # one extra shard each


def test_resume_through_the_distributed_state_dict_helpers(results: list[dict[str, Any]]) -> None:
    model = mlp()
    opt = GCSAM(model.parameters(), torch.optim.Adam, rho=0.2, lr=0.01, mode=Periodic(2))
    train(model, opt, None, conv=False)
    for rank in range(WORLD):
        assert_weights(results[rank]["resume"], full(model), results[rank]["backend"])


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("shard-1", r"parameter 0 \(shape \(4, 6\)\) is a DTensor placed \(Shard\(dim=1\),\)"),
        ("mixed", r"parameter 4 \(shape \(3, 2\)\) is a plain tensor and parameter 0"),
        ("named", r"'wide' is a DTensor placed \(Shard\(dim=1\),\).*shard it along dim 0"),
        ("ddp", r"model= is a DistributedDataParallel module over DTensor \(FSDP2\)"),
    ],
)
def test_bad_setups_raise_before_any_weight_changes(
    results: list[dict[str, Any]], key: str, match: str
) -> None:
    import re

    for rank in range(WORLD):
        message = results[rank]["errors"][key]
        assert message.startswith("unchanged: "), message
        assert re.search(match, message), message
