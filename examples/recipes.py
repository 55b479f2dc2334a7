"""GCSAM recipes in one runnable file: closure and two-step styles, BatchNorm, gradient clipping,
gradient accumulation, bf16 autocast, the fp16 GradScaler recipe, the cheap modes' loop and a
rho schedule.

    python examples/recipes.py          # a few seconds on a CPU; uses CUDA when present

Each recipe trains a small CNN on random data for a few steps and prints its losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from gcsam import GCSAM, LookSAM, MomentumAscent, ProportionalRho, frozen_bn_stats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 10),
    ).to(DEVICE)  # fmt: skip
    x = torch.randn(32, 3, 16, 16, device=DEVICE)
    y = torch.randint(0, 10, (32,), device=DEVICE)
    return model, x, y


def closure_style(steps: int = 5) -> list[float]:
    """``opt.step(closure)``: the closure runs twice; BN statistics move on the first pass only."""
    model, x, y = model_and_data()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with frozen_bn_stats(model, enabled=opt.descending):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return [opt.step(closure).item() for _ in range(steps)]


def two_step_style_with_clipping(steps: int = 5, max_norm: float = 1.0) -> list[float]:
    """``first_step`` / ``second_step``, clipping the descent gradient before the base step."""
    model, x, y = model_and_data()
    opt = GCSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)  # w -> w + eps
        try:
            with frozen_bn_stats(model):
                F.cross_entropy(model(x), y).backward()
        except BaseException:
            opt.restore()  # never leave the weights at w + eps
            raise
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.second_step(zero_grad=True)  # w + eps -> w, then the AdamW step
        losses.append(loss.item())
    return losses


def gradient_accumulation(steps: int = 5, micro_batches: int = 4) -> list[float]:
    """Accumulate micro-batch gradients inside the closure: one ascent and one descent per step."""
    model, x, y = model_and_data()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), device=DEVICE)
        with frozen_bn_stats(model, enabled=opt.descending):
            for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
                loss = F.cross_entropy(model(xb), yb) / micro_batches
                loss.backward()
                total += loss.detach()
        return total

    return [opt.step(closure).item() for _ in range(steps)]


def bf16_autocast(steps: int = 5) -> list[float]:
    """bf16 autocast needs nothing special: weights and gradients stay fp32."""
    model, x, y = model_and_data()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with (
            torch.autocast(DEVICE, dtype=torch.bfloat16),
            frozen_bn_stats(model, enabled=opt.descending),
        ):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return [opt.step(closure).item() for _ in range(steps)]


def fp16_grad_scaler(steps: int = 5) -> list[float]:
    """fp16 autocast with ``GradScaler``: pass the scaler to the optimizer, update it once a step.

    ``first_step(scaler=...)`` unscales the ascent gradient and skips the whole step when it
    overflowed; ``second_step(scaler=...)`` restores ``w`` and steps through
    ``scaler.step(opt.base_optimizer)``, which unscales the descent gradient and skips on inf.
    To clip under a scaler, call ``scaler.unscale_(opt.base_optimizer)`` before clipping.
    """
    model, x, y = model_and_data()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE)
    losses = []
    for _ in range(steps):
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        with torch.autocast(DEVICE, dtype=torch.float16), frozen_bn_stats(model):
            second = F.cross_entropy(model(x), y)
        scaler.scale(second).backward()
        scaler.unscale_(opt.base_optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        losses.append(loss.item())
    return losses


def cheap_modes_two_step(steps: int = 10) -> list[float]:
    """The two-step loop that fits every mode: LookSAM (the full step every 5th step), then
    Momentum-SAM (one pass at the momentum-perturbed point)."""
    losses = []
    for mode in (LookSAM(every=5), MomentumAscent()):
        model, x, y = model_and_data()
        opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, mode=mode, lr=0.1, momentum=0.9)
        for _ in range(steps // 2):
            with opt.ascent_pass():  # MomentumAscent moves the weights here
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            opt.first_step(zero_grad=True)  # ascends only on this mode's ascent steps
            if opt.descending:  # the step took the ascent: a second pass at w + eps
                with frozen_bn_stats(model):
                    F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            losses.append(loss.item())
    return losses


def rho_follows_lr(steps: int = 5) -> list[float]:
    """GSAM's rule: rho decays with the learning rate (cosine here)."""
    model, x, y = model_and_data()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rho_schedule = ProportionalRho(opt)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with frozen_bn_stats(model, enabled=opt.descending):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(steps):
        losses.append(opt.step(closure).item())
        lr_schedule.step()
        rho_schedule.step()
    return losses


def main() -> None:
    for recipe in (
        closure_style,
        two_step_style_with_clipping,
        gradient_accumulation,
        bf16_autocast,
        fp16_grad_scaler,
        cheap_modes_two_step,
        rho_follows_lr,
    ):
        losses = recipe()
        print(f"{recipe.__name__:<30} loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
