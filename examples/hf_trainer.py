"""GCSAM under the Hugging Face Trainer: a small CNN on scikit-learn's bundled digits.

    pip install -e ".[transformers,examples]"
    python examples/hf_trainer.py                      # about 10 seconds on 2 CPU cores
    python examples/hf_trainer.py --bf16 --accumulate 2 --mode periodic --output-dir out

The training settings are HF's own ``TrainingArguments``; only GCSAM's are
``SharpnessAwareArguments``. Writes checkpoints (one per epoch) to ``--output-dir`` if given,
else nothing (a temporary directory, removed). Prints the test accuracy.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import TrainingArguments, set_seed

from gcsam.integrations.transformers import SharpnessAwareArguments, SharpnessAwareTrainer


class DigitsCNN(nn.Module):
    """What the Trainer expects of a model: keyword inputs, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )  # fmt: skip

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.net(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Digits(Dataset):
    """Images ``(1, 8, 8)`` in [0, 1] and their labels, as dicts."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def digits_split() -> tuple[Digits, Digits]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return Digits(x[order[:1400]], y[order[:1400]]), Digits(x[order[1400:]], y[order[1400:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both passes")
    parser.add_argument("--mode", default=None, help="periodic, looksam, momentum or adaptive")
    parser.add_argument("--output-dir", default=None, help="where to write checkpoints")
    args = parser.parse_args()
    set_seed(0)
    train, test = digits_split()
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch,
            use_cpu=not torch.cuda.is_available(),  # HF's bf16 check needs it said on a CPU
            num_train_epochs=args.epochs,
            per_device_train_batch_size=64 // args.accumulate,
            gradient_accumulation_steps=args.accumulate,
            learning_rate=3e-3,
            weight_decay=1e-4,
            lr_scheduler_type="cosine",
            bf16=args.bf16,
            save_strategy="epoch" if args.output_dir else "no",
            logging_steps=10,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = SharpnessAwareTrainer(
            model=DigitsCNN(),
            args=training_args,
            train_dataset=train,
            sharpness_aware=SharpnessAwareArguments(rho=0.05, mode=args.mode),
        )
        trainer.train()
        logits, labels, _ = trainer.predict(test)
    accuracy = (torch.as_tensor(logits).argmax(1) == torch.as_tensor(labels)).float().mean()
    precision = "bf16" if args.bf16 else "fp32"
    print(f"gcsam (transformers, {precision}): test accuracy {100 * accuracy:.2f} %")


if __name__ == "__main__":
    main()
