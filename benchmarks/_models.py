"""The models whose parameters the optimizer-step benchmarks use (plain torch, built on the CPU):
CIFAR ResNet-18 (few large tensors) and a small GPT-style transformer (many small ones)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and a projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, BasicBlock stages [2, 2, 2, 2] of width w, 2w, 4w, 8w."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        in_planes = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**stage
            for block_stride in (stride, 1):
                layers.append(BasicBlock(in_planes, planes, block_stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with separate q/k/v projections (many small tensors)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def heads(proj: nn.Linear) -> Tensor:
            return proj(h).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(
            heads(self.q), heads(self.k), heads(self.v), is_causal=True
        )
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SmallTransformer(nn.Module):
    """GPT-style language model: token and position embeddings, blocks, final LayerNorm, head."""

    def __init__(
        self,
        vocab: int = 1000,
        d_model: int = 192,
        n_layers: int = 12,
        n_heads: int = 3,
        ctx: int = 128,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(ctx, d_model))
        self.blocks = nn.Sequential(*(TransformerBlock(d_model, n_heads) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18_w16": lambda: CifarResNet18(width=16),
    "resnet18_w64": lambda: CifarResNet18(width=64),
    "transformer_d192": lambda: SmallTransformer(),
}


@dataclass
class Problem:
    """A model's parameter tensors and fixed random gradients for them (fp32)."""

    name: str
    weights: list[Tensor]
    grads: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights)

    @property
    def param_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.numel / 1e6:.2f} M parameters, {len(self.weights)} tensors, "
            f"{self.param_bytes / 2**20:.1f} MiB fp32"
        )


def make_problem(name: str, seed: int = 0, grad_scale: float = 1e-2) -> Problem:
    """The parameters of model ``name`` (of :data:`MODELS`) and ``N(0, grad_scale^2)``
    gradients, the same for a given seed."""
    torch.manual_seed(seed)
    weights = [p.detach().clone() for p in MODELS[name]().parameters()]
    grads = [torch.randn_like(w).mul_(grad_scale) for w in weights]
    return Problem(name, weights, grads)
