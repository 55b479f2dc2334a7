"""Train a small CNN on scikit-learn's bundled digits with SGD, SAM and GCSAM; print test accuracy.

    python examples/quickstart.py            # about 30 seconds on 2 CPU cores
    python examples/quickstart.py --epochs 5 --seeds 0

Needs scikit-learn (``pip install -e ".[examples]"``) for the data only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from gcsam import GCSAM, SAM, SharpnessAwareOptimizer, frozen_bn_stats


def load_digits_split(seed: int) -> tuple[torch.Tensor, ...]:
    """Stratified 80/20 split of the 1,797 digits, images ``(N, 1, 8, 8)`` scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(), random_state=seed
    )
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def small_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes),
    )  # fmt: skip


def make_optimizer(name: str, model: nn.Module, lr: float, rho: float) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **kwargs)
    family = {"sam": SAM, "gcsam": GCSAM}[name]
    return family(model.parameters(), torch.optim.SGD, rho=rho, **kwargs)


def train(name: str, seed: int, epochs: int, lr: float, rho: float) -> float:
    """Train one model and return its test accuracy in percent."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    torch.manual_seed(seed)
    model = small_cnn()
    opt = make_optimizer(name, model, lr, rho)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train)).split(64):
            x, y = x_train[batch], y_train[batch]
            if isinstance(opt, SharpnessAwareOptimizer):

                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    opt.zero_grad()
                    # The descent pass must not move the BatchNorm statistics (even at rho=0).
                    with frozen_bn_stats(model, enabled=opt.descending):
                        loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (default 15)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM/GCSAM radius (default 0.05)")
    parser.add_argument(
        "--optimizers", nargs="+", default=["sgd", "sam", "gcsam"], choices=["sgd", "sam", "gcsam"]
    )
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    print(f"digits, small CNN, {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'optimizer':<10} {'test acc % (mean +- std)':<26} {'per seed':<24} time")
    for name in args.optimizers:
        start = time.perf_counter()
        accs = torch.tensor([train(name, s, args.epochs, args.lr, args.rho) for s in args.seeds])
        std = accs.std().item() if len(accs) > 1 else 0.0
        per_seed = " ".join(f"{a:.2f}" for a in accs.tolist())
        print(
            f"{name:<10} {accs.mean().item():6.2f} +- {std:<16.2f} {per_seed:<24} "
            f"{time.perf_counter() - start:.1f}s"
        )


if __name__ == "__main__":
    main()
