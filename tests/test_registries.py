"""The registries are the single source of truth: every registered optimizer, model and data set
builds, trains, and shows up in ``--help`` and the report; the layers import one way."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

pytest.importorskip("sklearn")

from gcsam import SharpnessAwareOptimizer, centralize_gradient
from gcsam.toolkit import cli
from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.data import DATASETS, iterate_batches
from gcsam.toolkit.models import MODELS
from gcsam.toolkit.optimizers import (
    BASES,
    OPTIMIZERS,
    OptimizerSpec,
    StepKind,
    register_optimizer,
)
from gcsam.toolkit.report import format_report, load_runs, summarize
from gcsam.toolkit.trainer import Trainer

SRC = Path(__file__).resolve().parents[1] / "src" / "gcsam"


def one_step_trainer(tmp_path: Path, optimizer: str) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    """A trainer on digits (small CNN, seed 0) and its first training batch, not yet stepped."""
    trainer = Trainer(TrainConfig(optimizer=optimizer, batch_size=32), tmp_path, progress=False)
    images, labels = next(iter(iterate_batches(trainer.data.train, 32, shuffle=False)))
    return trainer, trainer._inputs(images, train=True), labels


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_registered_optimizer_trains_one_step(tmp_path: Path, name: str) -> None:
    trainer, x, y = one_step_trainer(tmp_path, name)
    spec = OPTIMIZERS[name]
    assert isinstance(trainer.optimizer, SharpnessAwareOptimizer) == spec.sharpness_aware
    before = weights(trainer.model)
    loss, correct, count = trainer._train_step(x, y)
    after = weights(trainer.model)
    # the examples of the first pass: all of the batch, or the part f-gcsam ascends from
    assert count == (round(0.5 * len(y)) if name == "f-gcsam" else len(y))
    assert torch.isfinite(torch.tensor(loss)) and 0 <= correct <= count
    assert all(torch.isfinite(w).all() for w in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("base", BASES)
def test_the_gc_loop_centralizes_the_gradient(tmp_path: Path, base: str) -> None:
    """``gc-<base>`` equals ``<base>`` stepped on the centralized gradient, and differs from
    ``<base>`` on the raw one: deleting the loop's centralization fails this test."""
    gc, x, y = one_step_trainer(tmp_path / "gc", f"gc-{base}")
    gc._train_step(x, y)
    plain, _, _ = one_step_trainer(tmp_path / "plain", base)
    plain._train_step(x, y)
    reference, _, _ = one_step_trainer(tmp_path / "reference", base)
    reference.optimizer.zero_grad()
    F.cross_entropy(reference.model(x), y).backward()
    centralize_gradient([p.grad for p in reference.model.parameters()])
    reference.optimizer.step()
    for got, want in zip(weights(gc.model), weights(reference.model), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    moved_apart = [
        not torch.allclose(a, b, rtol=0, atol=1e-6)
        for a, b in zip(weights(gc.model), weights(plain.model), strict=True)
    ]
    assert any(moved_apart)


def parser_help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_lists_every_registered_name(command: str, capsys: pytest.CaptureFixture) -> None:
    text = parser_help(command, capsys)
    for registry in (OPTIMIZERS, MODELS, DATASETS):
        for name, spec in registry.items():
            assert f"  {name}" in text and spec.summary.split()[0] in text, name


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_trains_in_the_toolkit(tmp_path: Path, name: str) -> None:
    cfg = TrainConfig(optimizer="sgd", model=name, width=0.25, batch_size=8)
    trainer = Trainer(cfg, tmp_path, progress=False)
    images, labels = next(iter(iterate_batches(trainer.data.train, 8, shuffle=False)))
    loss, _, _ = trainer._train_step(trainer._inputs(images, train=True), labels)
    assert torch.isfinite(torch.tensor(loss))


def test_dataset_defaults_come_from_the_registry() -> None:
    for name, spec in DATASETS.items():
        assert TrainConfig(dataset=name).resolved().augment == spec.default_augment
    with pytest.raises(ConfigError, match="dataset must be one of"):
        TrainConfig(dataset="imagenet").resolved()


def fake_run(folder: Path, optimizer: str, seed: int, accuracy: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"optimizer": optimizer, "seed": seed}))
    test = {"accuracy": accuracy, "loss": 1 - accuracy}
    (folder / "summary.json").write_text(json.dumps({"optimizer": optimizer, "test": test}))


def test_the_report_shows_every_registered_optimizer_in_registry_order(tmp_path: Path) -> None:
    names = list(OPTIMIZERS)
    for i, name in enumerate(reversed(names)):
        fake_run(tmp_path / f"{name}-seed0", name, 0, 0.5 + i / 100)
    data = summarize(load_runs([tmp_path]), reference="gcsam")
    assert data.optimizers == names
    text = format_report(data)
    assert all(f"| {name} " in text for name in names)


def test_one_new_entry_is_a_new_optimizer(tmp_path: Path) -> None:
    """The README's recipe: register a spec, and the trainer, config and report know it."""
    spec = OptimizerSpec(
        "test-nesterov",
        "SGD with Nesterov momentum",
        StepKind.PLAIN,
        lambda params, base, cfg, ddp: torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True
        ),
        base="sgd",
    )
    register_optimizer(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_optimizer(spec)
        trainer, x, y = one_step_trainer(tmp_path, "test-nesterov")
        assert trainer.cfg.lr == BASES["sgd"].lr
        assert trainer.optimizer.param_groups[0]["nesterov"]
        trainer._train_step(x, y)
    finally:
        del OPTIMIZERS["test-nesterov"]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the gcsam modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.removesuffix(".__init__")
    else:
        package = package.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("gcsam")}


def test_the_library_never_imports_the_toolkit() -> None:
    library = [p for p in SRC.rglob("*.py") if "toolkit" not in p.parts]
    assert len(library) > 5
    for path in library:
        if path.name == "__main__.py":  # `python -m gcsam` is the command
            continue
        toolkit = {m for m in imported_modules(path) if m.startswith("gcsam.toolkit")}
        assert not toolkit, f"{path.name} imports {toolkit}"


def test_integrations_import_the_library_only_and_nothing_imports_them() -> None:
    integrations = list((SRC / "integrations").rglob("*.py"))
    assert len(integrations) >= 2
    for path in integrations:
        toolkit = {m for m in imported_modules(path) if m.startswith("gcsam.toolkit")}
        assert not toolkit, f"{path.name} imports {toolkit}"
    for path in SRC.rglob("*.py"):
        if "integrations" not in path.parts:
            users = {m for m in imported_modules(path) if m.startswith("gcsam.integrations")}
            assert not users, f"{path.relative_to(SRC)} imports {users}"


def test_import_gcsam_needs_torch_alone() -> None:
    code = (
        "import sys, gcsam; "
        "print(sorted(m for m in ('lightning', 'transformers', 'accelerate', 'numpy', "
        "'matplotlib', 'sklearn') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # torch itself imports numpy when it is installed; nothing else may come in
    assert done.stdout.strip() in ("[]", "['numpy']"), done.stdout


def test_a_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "gcsam.integrations.lightning", raising=False)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # "not installed"
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'gcsam\[lightning\]'"):
        import gcsam.integrations.lightning  # noqa: F401


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("config", ("trainer", "compare", "measure", "cli", "report")),
        ("optimizers", ("config", "trainer", "compare", "measure", "cli", "report")),
        ("rundir", ("trainer", "compare", "measure", "cli", "report")),
        ("data", ("config", "trainer", "compare", "measure", "cli", "report", "rundir")),
        ("models", ("config", "trainer", "compare", "measure", "cli", "report", "rundir")),
        ("trainer", ("compare", "measure", "cli", "report")),
        ("report", ("trainer", "compare", "measure", "cli")),
    ],
)
def test_toolkit_imports_go_one_way(lower: str, upper: tuple[str, ...]) -> None:
    root = SRC / "toolkit" / lower
    paths = list(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    forbidden = {f"gcsam.toolkit.{name}" for name in upper}
    for path in paths:
        bad = {m for m in imported_modules(path) for f in forbidden if m.startswith(f)}
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


@pytest.mark.parametrize(("missing", "code"), [("matplotlib", 2), ("not_a_toolkit_dep", None)])
def test_a_missing_toolkit_dependency_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, missing: str, code: int | None
) -> None:
    import types

    import gcsam.toolkit

    def main(argv: list[str] | None) -> int:
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setitem(sys.modules, "gcsam.toolkit.cli", types.SimpleNamespace(main=main))
    if code is None:  # not the toolkit's: the traceback is the useful message
        with pytest.raises(ModuleNotFoundError):
            gcsam.toolkit.main([])
        return
    assert gcsam.toolkit.main([]) == code
    assert "pip install 'gcsam[toolkit]'" in capsys.readouterr().err


def test_every_setting_is_a_flag(capsys: pytest.CaptureFixture) -> None:
    import dataclasses

    text = parser_help("train", capsys)
    for field in dataclasses.fields(TrainConfig):
        if field.name != "extra":  # free-form, config files only
            assert "--" + field.name.replace("_", "-") in text, field.name
