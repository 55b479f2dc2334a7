"""Each mode's ``state_dict()["sharpness_aware"]`` entry: only its own keys, checked before
anything loads (a bad entry names its key and leaves the optimizer as it was, groups shared
with the base and with an LR scheduler), and a mode's state across ``opt.mode = ...``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import on_device
from torch import nn

from gcsam import GCSAM, AdaptiveAscent, AscentFraction, LookSAM, MomentumAscent, Periodic

MODES: dict[str, Any] = {
    "full": None,
    "periodic": Periodic(every=2),
    "looksam": LookSAM(every=2),
    "momentum": MomentumAscent(),
    "adaptive": AdaptiveAscent(),
    "fraction": AscentFraction(0.5),
}
OWN_KEYS = {
    "looksam": {"look_norm", "look_valid", "look_direction"},
    "adaptive": {"adaptive_stats"},
}


def trained(mode: Any, steps: int = 3, device: str = "cpu") -> tuple[nn.Module, GCSAM, Any]:
    """A model on ``device``, its optimizer after ``steps`` steps, and an LR scheduler on the
    optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, mode=mode)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        batch = on_device(
            device, (torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen))
        )

        def closure(batch: Any = batch) -> torch.Tensor:
            opt.zero_grad()
            x, y = opt.pass_batch(batch)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        scheduler.step()
    return model, opt, scheduler


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_saves_its_own_state(mode: str, device: str) -> None:
    entry = trained(MODES[mode], device=device)[1].state_dict()["sharpness_aware"]
    assert set(entry) == {"mode", "steps"} | OWN_KEYS.get(mode, set())
    assert entry["mode"] == mode and entry["steps"] == 3


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda entry: entry.__setitem__(key, value)


def _direction(index: Any, value: Callable[[torch.Tensor], Any]) -> Callable[[dict], None]:
    def change(entry: dict[str, Any]) -> None:
        first = next(iter(entry["look_direction"].values()))
        entry["look_direction"] = {index: value(first)}

    return change


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("periodic", lambda entry: entry.pop("steps"), r"'steps' must be present"),
    ("periodic", _set("steps", "abc"), r"'steps' must be an integer >= 0, got 'abc'"),
    ("full", _set("steps", -1), r"'steps' must be an integer >= 0"),
    ("momentum", _set("steps", 2.5), r"'steps' must be an integer >= 0"),
    ("fraction", _set("steps", True), r"'steps' must be an integer >= 0"),
    ("looksam", _set("look_direction", [1]), r"'look_direction' must be a dict"),
    ("looksam", _direction(99, lambda t: t), r"keyed by parameter indices 0\.\.3, got 99"),
    ("looksam", _direction(-1, lambda t: t), r"keyed by parameter indices"),
    ("looksam", _direction("0", lambda t: t), r"keyed by parameter indices"),
    ("looksam", _direction(0, lambda t: t[:1]), r"'look_direction\[0\]' must be a tensor of shape"),
    ("looksam", _direction(0, lambda t: "x"), r"'look_direction\[0\]' must be a tensor"),
    ("looksam", _direction(0, lambda t: t * math.nan), r"'look_direction\[0\]' must be finite"),
    ("looksam", _set("look_valid", "yes"), r"'look_valid' must be True or False"),
    ("looksam", _set("look_norm", math.nan), r"'look_norm' must be a finite number >= 0"),
    ("looksam", _set("look_norm", -1.0), r"'look_norm' must be a finite number >= 0"),
    ("looksam", _set("look_norm", "1"), r"'look_norm' must be a number"),
    ("looksam", lambda entry: entry.pop("look_direction"), r"'look_direction' must be present"),
    ("adaptive", _set("adaptive_stats", [1.0, 2.0, 3.0]), r"'adaptive_stats' must be \[mean"),
    ("adaptive", _set("adaptive_stats", [math.nan, 0.0]), r"'adaptive_stats' must be \[mean"),
    ("adaptive", _set("adaptive_stats", [1.0, -1.0]), r"'adaptive_stats' must be \[mean"),
    ("adaptive", _set("adaptive_stats", "x"), r"'adaptive_stats' must be \[mean"),
]


@pytest.mark.parametrize(("mode", "change", "match"), BAD)
def test_a_damaged_entry_names_its_key_and_loads_nothing(mode: str, change, match: str, device):
    _, source, _ = trained(MODES[mode], steps=4, device=device)
    saved = copy.deepcopy(source.state_dict())
    change(saved["sharpness_aware"])
    _, opt, scheduler = trained(MODES[mode], device=device)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)
    assert after["param_groups"] == before["param_groups"]
    assert after["sharpness_aware"]["steps"] == 3
    # the groups are still the base's, so the scheduler still sets the rate the base uses
    assert opt.param_groups is opt.base_optimizer.param_groups
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


@pytest.mark.parametrize(
    ("entry", "match"),
    [({"steps": 1}, "with a 'mode'"), ([1, 2], "with a 'mode', got list")],
)
def test_an_entry_without_a_mode_is_refused(entry: Any, match: str) -> None:
    _, opt, _ = trained(None)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(opt.state_dict() | {"sharpness_aware": entry})


def test_an_unused_direction_may_be_non_finite(device: str) -> None:
    """A non-finite step leaves LookSAM's g_v unfinished and marked invalid: such a state dict
    loads (the next full step replaces it), as it always has."""
    _, opt, _ = trained(LookSAM(every=2), steps=4, device=device)
    saved = copy.deepcopy(opt.state_dict())
    entry = saved["sharpness_aware"]
    entry["look_valid"], entry["look_norm"] = False, math.nan
    entry["look_direction"] = {i: t * math.inf for i, t in entry["look_direction"].items()}
    fresh = trained(LookSAM(every=2), device=device)[1]
    fresh.load_state_dict(saved)
    assert fresh.state_dict()["sharpness_aware"]["steps"] == 4


@pytest.mark.parametrize("mode", list(MODES))
def test_entries_of_the_older_format_load(mode: str, device: str) -> None:
    """Before each mode kept only its own state, every entry had every mode's keys."""
    _, source, _ = trained(MODES[mode], steps=4, device=device)
    saved = copy.deepcopy(source.state_dict())
    legacy = {"adaptive_stats": [0.0, 0.0], "look_norm": 0.0, "look_valid": False}
    saved["sharpness_aware"] = legacy | {"look_direction": {}} | saved["sharpness_aware"]
    fresh = trained(MODES[mode], device=device)[1]
    fresh.load_state_dict(saved)
    loaded, expected = fresh.state_dict()["sharpness_aware"], source.state_dict()["sharpness_aware"]
    directions = loaded.pop("look_direction", {}), expected.pop("look_direction", {})
    assert loaded == expected
    assert directions[0].keys() == directions[1].keys()
    assert all(torch.equal(directions[0][i], directions[1][i]) for i in directions[0])


def test_a_mode_of_the_same_kind_keeps_the_state_and_another_keeps_the_count(device) -> None:
    _, opt, _ = trained(AdaptiveAscent(threshold=1.0), steps=4, device=device)
    stats = opt.state_dict()["sharpness_aware"]["adaptive_stats"]
    assert stats[0] > 0
    opt.mode = AdaptiveAscent(threshold=-1.0)  # a threshold schedule
    assert opt.state_dict()["sharpness_aware"]["adaptive_stats"] == stats
    opt.mode = Periodic(every=3)
    assert opt.state_dict()["sharpness_aware"] == {"mode": "periodic", "steps": 4}
    opt.mode = AdaptiveAscent()
    assert opt.state_dict()["sharpness_aware"]["adaptive_stats"] == [0.0, 0.0]  # started anew


def test_a_mode_shared_by_two_optimizers_keeps_two_states() -> None:
    mode = LookSAM(every=2)
    a, b = trained(mode, steps=3)[1], trained(mode, steps=1)[1]
    assert a.mode is b.mode is mode
    assert a.state_dict()["sharpness_aware"]["steps"] == 3
    assert b.state_dict()["sharpness_aware"]["steps"] == 1


def test_an_unregistered_mode_class_is_refused() -> None:
    class Mine(Periodic):
        pass

    with pytest.raises(ValueError, match="Mine is not a registered mode"):
        trained(Mine())
