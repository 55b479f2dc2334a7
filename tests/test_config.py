"""Training settings: typed checks in TrainConfig, config files, the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from gcsam.toolkit import cli
from gcsam.toolkit.cli import build_parser, main
from gcsam.toolkit.config import CHECKS, MAX_DEPTH, PRESETS, ConfigError, TrainConfig
from gcsam.toolkit.flags import read_config_file, refuse_no_effect, settings


def _settings(*argv: str) -> TrainConfig:
    """The resolved config ``gcsam train ARGV`` would run, without training."""
    values, _ = settings(build_parser().parse_args(["train", *argv]), set())
    return TrainConfig(**values).resolved()


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line ``gcsam train ARGV`` prints before it exits 2."""
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcsam: error: ") and err.count("\n") == 1, err
    return err


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- TrainConfig -------------------------------------------------------------------------------


def test_defaults_depend_on_the_optimizer() -> None:
    assert TrainConfig(optimizer="gcsam").resolved().lr == 1e-3  # Adam base
    sgd = TrainConfig(optimizer="sgd").resolved()
    assert (sgd.lr, sgd.weight_decay) == (0.05, 5e-4)
    assert TrainConfig(optimizer="asam").resolved().rho == 0.5
    assert TrainConfig(optimizer="adam").resolved().rho is None
    assert TrainConfig(dataset="cifar10").resolved().augment == "crop+flip"
    assert TrainConfig(dataset="digits").resolved().augment == "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(optimizer="lion"), "optimizer must be one of"),
        (dict(base="rmsprop"), "base must be one of"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(rho=-0.1), "rho must be >= 0"),
        (dict(label_smoothing=1.0), r"label_smoothing must be a fraction in \[0, 1\)"),
        (dict(patience=0), "patience"),
        (dict(target_accuracy=97.0), r"target_accuracy must be a fraction in \(0, 1\]"),
        (dict(schedule="linear"), "schedule must be one of"),
        (dict(amp="fp8"), "amp must be one of"),
    ],
)
def test_bad_settings_name_themselves(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**change).resolved()


def test_unknown_keys_in_a_saved_config_are_refused() -> None:
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_json({"learning_rate": 0.1})


def test_presets_are_valid_configs() -> None:
    for name, values in PRESETS.items():
        cfg = TrainConfig(**values).resolved()
        assert cfg.lr == 1e-4 and cfg.rho == 0.05 and cfg.base == "adam", name


def test_every_setting_has_one_check() -> None:
    assert set(CHECKS) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("lr", "abc", "positive (a finite number > 0)"),
        ("lr", math.inf, "positive"),
        ("lr", "nan", "positive"),
        ("lr", True, "positive"),
        ("weight_decay", math.inf, ">= 0 (a finite number)"),
        ("rho", "0.05x", ">= 0"),
        ("ddp_timeout_s", math.inf, "positive"),
        ("ddp_timeout_s", 0, "positive"),
        ("epochs", 1.5, "an integer >= 1"),
        ("batch_size", True, "an integer >= 1"),
        ("batch_size", "64", "an integer >= 1"),
        ("seed", 1e23, "an integer >= 0"),
        ("seed", 2**64, f"an integer <= {2**63 - 1}"),
        ("folds", 1, "an integer >= 2"),
        ("val_fraction", 0, "a fraction in (0, 1)"),
        ("dropout", 1, "a fraction in [0, 1)"),
        ("momentum", -0.5, "a fraction in [0, 1)"),
        ("width", [1.0], "positive"),
        ("gc_descent", "yes", "true or false"),
        ("classes", "benign", "a non-empty list of strings"),
        ("classes", [], "a non-empty list of strings"),
        ("data_dir", 7, "a non-empty string"),
        ("extra", [1], "a mapping"),
        ("strategy", "deepspeed", "one of ddp, fsdp"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_what_is_expected(
    name: str, value: Any, expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{name: value}).resolved()
    assert str(error.value).startswith(f"{name} must be {expected}")
    assert str(error.value).endswith(f"got {value!r}")


def test_what_a_human_means_is_accepted_in_its_type() -> None:
    cfg = TrainConfig(lr="1e-3", weight_decay=0, warmup_epochs=1, rho="5e-2").resolved()
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.rho) == (1e-3, 0.0, 1.0, 0.05)
    assert all(type(v) is float for v in (cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.rho))
    assert cfg.resolved() == cfg


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"a": math.nan}, "extra.a must be a finite number"),
        ({"a": {1, 2}}, "extra.a must be a plain JSON value, got a set"),
        ({1: "x"}, "extra must have string keys"),
        ({"a": [[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]}, f"nested more than {MAX_DEPTH} levels"),
    ],
)
def test_extra_holds_plain_json_only(extra: dict[Any, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(extra=extra).resolved()


def test_extra_is_bounded_even_with_shared_references() -> None:
    laughs: list[Any] = ["lol"] * 10
    for _ in range(9):  # 10**10 strings by reference, a few hundred objects in memory
        laughs = [laughs] * 10
    with pytest.raises(ConfigError, match="extra holds more than"):
        TrainConfig(extra={"a": laughs}).resolved()


# -- config files ------------------------------------------------------------------------------


def test_yaml_scientific_notation_and_dashed_keys_are_settings(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 (no dot) as the string "1e-3"
    path = _write(tmp_path / "run.yaml", "lr: 1e-3\nweight-decay: 5e-4\nepochs: 3\n")
    cfg = _settings("--config", path)
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (1e-3, 5e-4, 3)


def test_a_runs_config_json_can_be_fed_back(tmp_path: Path) -> None:
    original = TrainConfig(optimizer="sam", lr="0.02", epochs=4).resolved()
    record = original.to_json() | {
        "split_sizes": {"train": 8, "val": 1, "test": 1},
        "versions": {"gcsam": "0", "torch": "0"},
        "num_classes": 10,
        "class_names": [str(k) for k in range(10)],
        "image_shape": [1, 8, 8],
        "model_size": {"parameters": 100},
    }
    path = _write(tmp_path / "config.json", json.dumps(record))
    assert _settings("--config", path) == original
    assert _settings("--config", path, "--seed", "3").seed == 3
    bad = _write(tmp_path / "other.json", json.dumps(record | {"learning_rate": 1}))
    with pytest.raises(ConfigError, match=r"unknown setting.*learning_rate"):
        _settings("--config", bad)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "seed: 1\nlr: [1, 2\nepochs: 3\n", r"invalid YAML: .* \(line 3, column"),
        ("bad.toml", "seed = 1\nlr = \n", r"invalid TOML: .*line 2"),
        ("bad.json", '{"seed": 1,\n"lr": }', r"invalid JSON: .* \(line 2, column 7\)"),
        ("tag.yaml", 'lr: !!python/object/apply:os.system ["true"]\n', "python/object/apply"),
        ("list.yaml", "- lr\n", "expected a mapping of settings"),
        ("twice.yaml", "batch-size: 8\nbatch_size: 9\n", "batch_size is given twice"),
        ("key.yaml", "1: 2\n", "keys must be setting names, got 1"),
        ("run.txt", "lr: 1\n", r"use a \.yaml, \.yml, \.toml or \.json file"),
        ("unknown.yaml", "learning_rate: 1\n", "unknown setting.*learning_rate"),
        ("preset.yaml", "preset: paper-mnist\n", "preset must be one of"),
        ("seed.yaml", "seed: 1e23\n", "seed must be an integer >= 0, got '1e23'"),
        ("lr.toml", 'lr = "inf"\n', "lr must be positive .*got 'inf'"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    err = _cli_error(capsys, "--config", _write(tmp_path / name, text))
    assert re.search(message, err), err


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both YAML loaders: libyaml's where PyYAML has it, the pure-Python one otherwise."""
    yaml = pytest.importorskip("yaml")
    if request.param == "pure-python":
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")


@pytest.mark.usefixtures("yaml_loader")
def test_yaml_anchors_and_aliases_are_refused_so_billion_laughs_cannot_run(tmp_path: Path) -> None:
    lines = ['extra:\n  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
    path = _write(tmp_path / "laughs.yaml", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"anchors and aliases .* not allowed \(line 2"):
        read_config_file(path)


@pytest.mark.usefixtures("yaml_loader")
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("top.yaml", "lr: 0.1\nepochs: 2\nlr: 0.01\n", "key 'lr' is given twice \\(line 3"),
        ("nested.yaml", "extra: {a: 1, b: [1, {a: 2}], a: 3}\n", "key 'a' is given twice"),
        ("top.json", '{"lr": 0.1, "lr": 0.01}', "key\\(s\\) 'lr' given twice"),
        ("nested.json", '{"extra": {"a": 1, "a": 2}}', "key\\(s\\) 'a' given twice"),
        ("top.toml", "lr = 0.1\nlr = 0.01\n", "invalid TOML"),
    ],
)
def test_a_key_given_twice_is_refused_not_overwritten(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    """YAML and JSON parsers keep the last of a repeated key silently: the first value the user
    wrote would be lost."""
    with pytest.raises(ConfigError, match=message):
        read_config_file(_write(tmp_path / name, text))


def test_the_same_key_in_different_mappings_is_not_a_repeat(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.yaml", "extra: {a: {k: 1}, b: {k: 2}, c: [{k: 3}, {k: 4}]}\n")
    assert read_config_file(path)["extra"]["c"] == [{"k": 3}, {"k": 4}]


@pytest.mark.parametrize(
    ("name", "template"),
    [("deep.yaml", "extra: {}"), ("deep.json", '{{"extra": {}}}'), ("deep.toml", "extra = {}")],
)
@pytest.mark.parametrize("depth", [MAX_DEPTH + 2, 5000])
def test_deep_nesting_is_refused_in_every_format(
    tmp_path: Path, name: str, template: str, depth: int
) -> None:
    path = _write(tmp_path / name, template.format("[" * depth + "]" * depth) + "\n")
    # libyaml stops the deepest YAML itself ("exceeded maximum nesting depth")
    refused = f"^--config {path}: .*(nested more than {MAX_DEPTH}|nesting depth)"
    with pytest.raises(ConfigError, match=refused):
        read_config_file(path)


@pytest.mark.usefixtures("yaml_loader")
def test_yaml_python_tags_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    tag = _write(tmp_path / "tag.yaml", "extra: !!python/object/apply:os.system [true]\n")
    with pytest.raises(ConfigError, match=r"python/object/apply:os\.system' \(line 1, column 8\)"):
        read_config_file(tag)
    nested = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    deep = _write(tmp_path / "deep.yaml", f"seed: 1\nextra: {nested}\n")
    with pytest.raises(ConfigError, match=rf"nested more than {MAX_DEPTH} levels deep \(line 2"):
        read_config_file(deep)


def test_a_huge_config_file_is_refused_unread(tmp_path: Path) -> None:
    path = _write(tmp_path / "huge.yaml", "# padding\n" * (2**21 // 10 + 1))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        read_config_file(path)


def test_a_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _cli_error(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert f"--config {tmp_path / 'nope.yaml'}: no such file" in err


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--rho", "--momentum"])
def test_non_finite_flags_are_refused(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    err = _cli_error(capsys, flag, "inf")
    assert f"{flag[2:].replace('-', '_')} must be" in err and "got inf" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: 1.5\n", "epochs must be an integer >= 1, got 1.5"),
        ("batch_size: true\n", "batch_size must be an integer >= 1, got True"),
        ('batch_size: "64"\n', "batch_size must be an integer >= 1, got '64'"),
        ("ddp_timeout_s: .inf\n", "ddp_timeout_s must be a finite number, got inf"),
        ("extra: {a: .nan}\n", "extra.a must be a finite number"),
    ],
)
def test_mistyped_values_in_a_file_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    err = _cli_error(capsys, "--config", _write(tmp_path / "run.yaml", text))
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
        (["train", "--optimizer", "nope"], "argument --optimizer: invalid choice: 'nope'"),
        (["study", "--jobs"], "argument --jobs: expected one argument"),
        (["nope"], "argument COMMAND: invalid choice: 'nope'"),
    ],
)
def test_a_flag_error_is_one_line_without_the_usage_block(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gcsam.toolkit.parser import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "usage:" not in err
    assert err.rstrip().endswith("--help)")


@pytest.mark.parametrize("value", ["-inf", "-nan", "-Infinity", "-1e-3", "-2.5e+4", "-.5", "-3"])
def test_every_negative_number_after_a_flag_is_its_value(value: str) -> None:
    """``--ae-threshold -inf`` was read as a missing value; now the setting's own check names
    what is wrong with it."""
    from gcsam.toolkit.parser import build_parser

    args = build_parser().parse_args(["train", "--ae-threshold", value])
    assert args.ae_threshold == float(value) or math.isnan(args.ae_threshold)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--optimizer", "gcsam", "--every", "3"],
            "--every has no effect with --optimizer gcsam (used by periodic-gcsam, look-gcsam)",
        ),
        (
            ["--optimizer", "adam", "--look-alpha", "0.5"],
            "--look-alpha has no effect with --optimizer adam (used by look-gcsam)",
        ),
        (
            ["--optimizer", "sam", "--ascent-fraction", "0.5"],
            "--ascent-fraction has no effect with --optimizer sam (used by f-gcsam)",
        ),
        (
            ["--optimizer", "gc-sgd", "--base", "adamw"],
            "--base has no effect with --optimizer gc-sgd (used by sam, asam, gcsam,",
        ),
        (
            ["--optimizer", "sam", "--momentum", "0.5"],
            "--momentum has no effect with Adam (used by SGD: --optimizer sgd, or --base sgd)",
        ),
        (["--strategy", "fsdp"], "--strategy has no effect in one process (it sets how"),
        (["--ddp-timeout-s", "9"], "--ddp-timeout-s has no effect in one process"),
        (
            ["--swa-start", "0.5", "--average", "ema"],
            "--swa-start has no effect without --average swa",
        ),
    ],
)
def test_a_flag_that_would_change_nothing_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    err = _cli_error(capsys, *argv, "--out", str(tmp_path / "run"))
    assert err.startswith(f"gcsam: error: {message}") and err.endswith("; leave it out\n"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "values", "workers"),
    [
        ({"every"}, dict(optimizer="periodic-gcsam", every=3), 1),
        ({"every", "look_alpha", "rho"}, dict(optimizer="look-gcsam", look_alpha=0.5), 1),
        ({"momentum", "base"}, dict(optimizer="gcsam", base="sgd", momentum=0.5), 1),
        ({"momentum"}, dict(optimizer="gc-sgd", momentum=0.5), 1),
        ({"strategy", "ascent", "ddp_timeout_s"}, dict(optimizer="sam", strategy="ddp"), 2),
        ({"ema_decay"}, dict(average="ema", ema_decay=0.9), 1),
        ({"lr", "epochs", "seed"}, dict(optimizer="adam"), 1),
    ],
)
def test_a_flag_that_acts_is_accepted(flags: set[str], values: dict, workers: int) -> None:
    refuse_no_effect(flags, TrainConfig(**values), workers)


def test_a_config_file_may_hold_settings_other_optimizers_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A config file (a run's config.json above all) holds every setting; flags alone are
    checked."""
    trained: list[TrainConfig] = []

    def train(cfg: TrainConfig, *args: Any, **kwargs: Any) -> None:
        trained.append(cfg)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "train", train)
    config = _write(tmp_path / "c.yaml", "optimizer: gcsam\nevery: 3\nlook_alpha: 0.5\n")
    assert main(["train", "--config", config, "--out", str(tmp_path / "run")]) == 2
    assert [(cfg.optimizer, cfg.every, cfg.look_alpha) for cfg in trained] == [("gcsam", 3, 0.5)]
