"""Baek et al.'s feature and head penalties (:mod:`gcsam.toolkit.penalties`): their value in
float64 by hand, one training step against the loss written out, the classifier found in every
registered model, off by default, and the settings they refuse."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from gcsam.toolkit import trainer as trainer_module
from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.data import iterate_batches
from gcsam.toolkit.models import MODELS, build_model
from gcsam.toolkit.penalties import HeadPenalties, head_penalties, output_layer
from gcsam.toolkit.trainer import Trainer
from gcsam.toolkit.world import World, check_strategy

pytest.importorskip("sklearn")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()


def test_the_penalty_is_the_formula() -> None:
    model, x = _mlp(), torch.randn(5, 4, dtype=torch.float64)
    penalties = HeadPenalties(model, feature=0.3, head=0.02)
    model(x)
    features = torch.relu(x @ model[0].weight.T + model[0].bias)
    expected = 0.3 * (features**2).sum(1).mean() + 0.02 * (model[2].weight ** 2).sum()
    assert penalties().item() == pytest.approx(expected.item(), rel=1e-6)  # float32 result
    with pytest.raises(RuntimeError, match="before a forward pass"):
        penalties()  # the features of a forward count once
    head_only = HeadPenalties(model, feature=0.0, head=0.5)
    assert head_only().item() == pytest.approx(0.5 * (model[2].weight ** 2).sum().item())


def test_remove_takes_the_hook_off() -> None:
    model = _mlp()
    penalties = HeadPenalties(model, feature=1.0, head=0.0)
    assert len(model[2]._forward_pre_hooks) == 1
    penalties.remove()
    assert not model[2]._forward_pre_hooks


def test_bad_penalties_and_models_are_refused() -> None:
    with pytest.raises(ValueError, match="penalties must be >= 0"):
        HeadPenalties(_mlp(), feature=-1.0, head=0.0)
    with pytest.raises(ValueError, match=r"no nn\.Linear layer.*set them to 0"):
        output_layer(nn.Sequential(nn.Conv2d(1, 2, 3)))
    assert head_penalties(_mlp(), 0.0, 0.0) is None  # off: no hook at all
    with pytest.raises(ConfigError, match="feature_penalty"):
        TrainConfig(feature_penalty=-0.1).resolved()


@pytest.mark.parametrize("name", MODELS)
def test_the_output_layer_of_every_model_gives_its_logits(name: str) -> None:
    small = {"width": 0.25} if name != "wrn" else {"depth": 10, "widen_factor": 1}
    if name == "vit":
        small = {"depth": 2, "width": 0.25}
    torch.manual_seed(0)
    model = build_model(name, 7, 3, 32, **small).eval()
    seen = []
    output_layer(model).register_forward_hook(lambda m, i, o: seen.append(o))
    logits = model(torch.randn(2, 3, 32, 32))
    assert len(seen) == 1 and torch.equal(seen[0], logits)


def _batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = next(iter(iterate_batches(trainer.data.train, 32, shuffle=False)))
    return trainer._inputs(images, train=True), labels


def test_a_training_step_descends_the_penalized_loss(tmp_path: Path) -> None:
    """Plain SGD (no momentum or decay) on small-cnn: one step is w - lr * grad of the loss
    written out, the features taken from the model's layers, not from the hook."""
    cfg = TrainConfig(
        optimizer="sgd", model="small-cnn", batch_size=32, augment="none", momentum=0.0,
        weight_decay=0.0, lr=0.1, feature_penalty=0.05, head_penalty=0.01,
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path, progress=False)
    reference = copy.deepcopy(trainer.model).train()
    x, y = _batch(trainer)
    trainer.model.train()
    trainer._train_step(x, y)
    features = torch.flatten(reference.pool(reference.features(x)), 1)
    head = output_layer(reference)
    loss = (
        F.cross_entropy(head(features), y)
        + 0.05 * features.pow(2).sum(1).mean()
        + 0.01 * head.weight.pow(2).sum()
    )
    loss.backward()
    for (name, after), before in zip(
        trainer.model.named_parameters(), reference.parameters(), strict=True
    ):
        expected = before.detach() - 0.1 * before.grad
        torch.testing.assert_close(after.detach(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_without_penalties_nothing_is_hooked(tmp_path: Path) -> None:
    trainer = Trainer(TrainConfig(model="small-cnn", batch_size=32), tmp_path, progress=False)
    assert trainer.penalties is None
    assert not any(m._forward_pre_hooks for m in trainer.model.modules())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"head_penalty": 0.1}, "--feature-penalty and --head-penalty .* use --strategy ddp"),
        ({"feature_penalty": 0.1}, "--feature-penalty and --head-penalty .* use --strategy ddp"),
        ({"average": "ema"}, "--average ema keeps a full copy"),
    ],
)
def test_fsdp_refuses_what_needs_the_whole_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict, message: str
) -> None:
    """Under --strategy fsdp with two workers (stood in for) the penalties and a weight average
    are refused in one line before any data is read or model built; one process, which FSDP
    leaves whole, keeps them."""

    def no_data(*args: object) -> None:
        raise AssertionError("data read before the refusal")

    monkeypatch.setattr(trainer_module, "join_world", lambda *args: World(rank=0, size=2))
    monkeypatch.setattr(trainer_module, "prepare_data", no_data)
    cfg = TrainConfig(model="small-cnn", batch_size=32, strategy="fsdp", **settings)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
    check_strategy("fsdp", 1, average="ema", penalties=True)  # one process: nothing to refuse
    check_strategy("ddp", 2, average="ema", penalties=True)
