"""GCSAM in PyTorch Lightning: a small CNN on scikit-learn's bundled digits.

    pip install -e ".[lightning,examples]"
    python examples/lightning_digits.py                      # about 20 seconds on 2 CPU cores
    python examples/lightning_digits.py --precision bf16-mixed --accumulate 2 --epochs 3

Writes nothing: no logger, no checkpoints. Prints the test accuracy.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gcsam import GCSAM
from gcsam.integrations.lightning import SharpnessAware, sharpness_aware_step


class DigitsClassifier(pl.LightningModule):
    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.automatic_optimization = False  # sharpness_aware_step takes both passes
        self.epochs = epochs
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )  # fmt: skip

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        loss = sharpness_aware_step(self, batch, self.loss)
        if loss is not None:  # None: a micro-batch that joined an accumulation window
            self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_accuracy", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        optimizer = GCSAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}  # stepped every epoch


def digits_loaders(batch_size: int) -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[test], y[test]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    train, test = digits_loaders(batch_size=64 // args.accumulate)
    model = DigitsClassifier(args.epochs)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        precision=args.precision,
        callbacks=[SharpnessAware(accumulate_grad_batches=args.accumulate, gradient_clip_val=5.0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train)
    accuracy = trainer.test(model, test, verbose=False)[0]["test_accuracy"]
    print(f"gcsam (lightning, {args.precision}): test accuracy {100 * accuracy:.2f} %")


if __name__ == "__main__":
    main()
