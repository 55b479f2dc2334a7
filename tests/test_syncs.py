"""Host-device synchronizations per step, for the full step and every mode.

A value the step reads back to Python (``.item()``, ``.tolist()``, ``bool(tensor)``, ...) makes
the host wait for the device: on CUDA it stalls the launch queue. On every device the tests count
those reads exactly; on CUDA they also count the synchronizations CUDA itself reports
(``torch.cuda.set_sync_debug_mode``). The counts are the floor each step keeps, and why:

- full step: 1, the ascent norm: whether it is finite decides on the host whether the weights
  move and the second pass and base step run (a skipped step changes nothing), and whether a
  norm that may have under- or overflowed in fp32 is measured again in fp64 (a second read then,
  in that rare case only);
- Periodic: that 1 on the steps with the ascent, none on the others;
- LookSAM: 2 on the full steps (the norm, and ``||g_v||``, whose finiteness decides whether the
  next ``k - 1`` steps reuse ``g_v``), none on the others;
- AdaptiveAscent: 1 for the decision (``||g||^2`` against the running statistics), plus the
  norm's on the steps that ascend;
- MomentumAscent: 1 (none at its first step, which has no momentum yet); AscentFraction: 1.

``GradScaler`` adds its own: ``scaler.step`` reads ``found_inf`` (1 per base step).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from gcsam import GCSAM, frozen_bn_stats
from gcsam.modes import AdaptiveAscent, AscentFraction, LookSAM, Mode, MomentumAscent, Periodic

# The Tensor methods that hand a value to Python.
_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__array__")
STEPS = 10
EVERY = 5
MODES: dict[str | None, Mode | None] = {
    None: None,
    "periodic": Periodic(every=EVERY),
    "looksam": LookSAM(every=EVERY),
    "momentum": MomentumAscent(),
    "adaptive": AdaptiveAscent(),
    "fraction": AscentFraction(),
}


@contextlib.contextmanager
def counting_reads() -> Iterator[list[str]]:
    """The names of the Tensor reads made inside, in order."""
    reads: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def counted(name: str):
        def read(self, *args, **kwargs):
            reads.append(name)
            return saved[name](self, *args, **kwargs)

        return read

    for name in _READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield reads
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def counting_cuda_syncs() -> Iterator[list[warnings.WarningMessage]]:
    """The synchronizations CUDA reports inside (an empty list off CUDA)."""
    if not torch.cuda.is_available():
        yield []
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        caught[:] = [w for w in caught if "synchronizing" in str(w.message)]


def train(device: str, mode: str | None, scaler: bool = False) -> list[tuple[int, int, int]]:
    """``STEPS`` closure steps of GCSAM on a small BatchNorm CNN: for each, the host reads, the
    CUDA syncs and the passes (closure calls)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).to(device)
    opt = GCSAM(
        model.parameters(),
        torch.optim.SGD,  # its foreach step reads nothing back (Adam reads its CPU step count)
        lr=0.01,
        momentum=0.9,
        mode=MODES[mode],
    )
    amp = torch.amp.GradScaler(device) if scaler else None
    x = torch.randn(8, 3, 8, 8).to(device)
    y = torch.randint(0, 3, (8,)).to(device)
    passes = 0

    def closure() -> torch.Tensor:
        nonlocal passes
        passes += 1
        opt.zero_grad()
        inputs, labels = opt.pass_batch((x, y))
        with frozen_bn_stats(model, enabled=opt.descending):
            loss = F.cross_entropy(model(inputs), labels)
        (loss if amp is None else amp.scale(loss)).backward()
        return loss

    counts = []
    for _ in range(STEPS):
        passes = 0
        if device == "cuda":
            torch.cuda.synchronize()
        with counting_reads() as reads, counting_cuda_syncs() as syncs:
            opt.step(closure, scaler=amp)
            if amp is not None:
                amp.update()
        counts.append((len(reads), len(syncs), passes))
    return counts


def full_steps_only(reads: int) -> list[int]:
    """``reads`` on the steps ``t % EVERY == 0``, none on the others."""
    return [reads if t % EVERY == 0 else 0 for t in range(STEPS)]


EXPECTED_READS = {
    None: [1] * STEPS,
    "periodic": full_steps_only(1),
    "looksam": full_steps_only(2),
    "momentum": [0] + [1] * (STEPS - 1),  # t = 0: no momentum yet, no ascent
    "fraction": [1] * STEPS,
}


@pytest.mark.parametrize("mode", [*EXPECTED_READS, "adaptive"])
def test_reads_per_step_are_the_floor_each_mode_keeps(device: str, mode: str | None) -> None:
    counts = train(device, mode)
    reads = [r for r, _, _ in counts]
    if mode == "adaptive":  # the decision, and the norm when it ascends (two passes)
        assert reads == [passes for _, _, passes in counts]
        assert {1, 2} <= set(reads)  # both kinds of step were taken
    else:
        assert reads == EXPECTED_READS[mode]
    if device == "cuda":  # every sync CUDA reports is one of the reads counted above
        assert [s for _, s, _ in counts] == reads


@pytest.mark.parametrize("mode", [None, "looksam"])
def test_grad_scaler_adds_its_own_read_per_step(device: str, mode: str | None) -> None:
    counts = train(device, mode, scaler=True)
    assert [r for r, _, _ in counts] == [n + 1 for n in EXPECTED_READS[mode]]
    if device == "cuda":
        assert [s for _, s, _ in counts] == [r for r, _, _ in counts]


def test_the_reads_counted_are_the_ones_made() -> None:
    value = torch.ones(2)
    with counting_reads() as reads:
        value.sum().item()
        value.tolist()
        bool(value[0])
        value.add(1)  # no read
    assert reads == ["item", "tolist", "__bool__"]
