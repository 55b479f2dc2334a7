"""Training regimes (:mod:`gcsam.toolkit.data.regimes`): stratified subsets, label noise and
long-tailed imbalance of the training split only, their checks in the config and on the command
line, their record in a run's ``config.json``; and each data set's default model (``convnet``).

Most tests run on in-memory splits whose images carry their own index (see
``test_data_helpers.coded_images``), so a test knows exactly which images were kept."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_data_helpers import coded_images, ids

from gcsam.toolkit import cli
from gcsam.toolkit.cli import build_parser
from gcsam.toolkit.config import CHOICES, RUN_RECORDS, ConfigError, TrainConfig
from gcsam.toolkit.data import (
    DATASETS,
    NOISE_KINDS,
    DataError,
    DatasetSpec,
    DataSplits,
    Regime,
    Split,
    apply_regime,
    load_dataset,
    regime_of,
)
from gcsam.toolkit.data.splits import channel_stats
from gcsam.toolkit.flags import registry_help, settings
from gcsam.toolkit.models import MODELS, build_model
from gcsam.toolkit.run_inputs import prepare_data
from gcsam.toolkit.rundir import read_run_config

FAST = ["--epochs", "1", "--batch-size", "256", "--quiet"]


def make_splits(counts: list[int], channels: int = 1, side: int = 4, seed: int = 0) -> DataSplits:
    """A data set whose training split holds ``counts[k]`` images of class k, the classes
    shuffled together; image i carries its index i (``ids``). Val and test: 20 and 30 images."""
    classes = len(counts)
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), counts))
    images = coded_images(len(labels), channels, side, side, seed=seed)
    train = Split(torch.from_numpy(images), torch.from_numpy(labels))

    def held(n: int, salt: int) -> Split:
        return Split(
            torch.from_numpy(coded_images(n, channels, side, side, seed=seed + salt)),
            torch.arange(n) % classes,
        )

    mean, std = channel_stats(train.images)
    return DataSplits(
        name="toy",
        train=train,
        val=held(20, 1),
        test=held(30, 2),
        class_names=[f"class-{k}" for k in range(classes)],
        mean=mean,
        std=std,
    )


def clean_labels(data: DataSplits, out: DataSplits) -> np.ndarray:
    """The original labels of the images ``out`` kept from ``data``."""
    return data.train.labels.numpy()[ids(out.train)]


def kept_counts(data: DataSplits, out: DataSplits) -> list[int]:
    return np.bincount(clean_labels(data, out), minlength=data.num_classes).tolist()


def largest_remainders(counts: list[int], size: int) -> list[int]:
    """The specification of a stratified subset's class counts, written out plainly: each
    class's share ``count * size / N`` rounded down but at least 1, then the classes with the
    largest remainder over that get one more (ties: the lower class), until ``size``; only if the
    minimum of one overshoots, the largest class gives back."""
    total = sum(counts)
    quota = [c * size / total for c in counts]
    take = [max(1, math.floor(q)) for q in quota]
    order = sorted(range(len(counts)), key=lambda k: -(quota[k] - take[k]))  # stable
    for k in order:
        if sum(take) >= size:
            break
        take[k] += 1
    while sum(take) > size:
        take[take.index(max(take))] -= 1
    return take


def long_tailed(counts: list[int], ratio: float) -> list[int]:
    """Class k keeps ``round(n * ratio ** (-k / (K - 1)))`` images, at least one."""
    n, last = min(counts), len(counts) - 1
    return [max(1, math.floor(n * ratio ** (-k / last) + 0.5)) for k in range(len(counts))]


def assert_untouched(data: DataSplits, out: DataSplits) -> None:
    """Val and test are the very same tensors; names and classes are kept."""
    for name in ("val", "test"):
        before, after = getattr(data, name), getattr(out, name)
        assert after.images is before.images and after.labels is before.labels, name
    assert (out.name, out.class_names) == (data.name, data.class_names)


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    pytest.importorskip("sklearn")
    return load_dataset("digits")


# -- Regime ------------------------------------------------------------------------------------


def test_the_default_regime_changes_nothing() -> None:
    data = make_splits([7, 5, 3])
    regime = Regime()
    assert not regime.changes_data
    out, record = apply_regime(data, regime, seed=0)
    assert torch.equal(out.train.images, data.train.images)
    assert torch.equal(out.train.labels, data.train.labels)
    assert (out.mean, out.std) == (data.mean, data.std)
    assert_untouched(data, out)
    assert record == {
        "train_size": 15,
        "class_counts": [7, 5, 3],
        "flipped_labels": 0,
        "flipped_fraction": 0.0,
        "val_label_noise": "clean",
    }


@pytest.mark.parametrize(
    "changes", [{"train_size": 10}, {"train_size": 0.5}, {"label_noise": 0.1}, {"imbalance": 2.0}]
)
def test_each_setting_changes_data(changes: dict[str, Any]) -> None:
    assert Regime(**changes).changes_data
    # noise_kind alone (no noise) and the neutral values change nothing
    assert not Regime(noise_kind="pair", label_noise=0.0, imbalance=1.0).changes_data


def test_regime_of_reads_the_five_settings() -> None:
    cfg = TrainConfig(
        train_size=300, label_noise=0.2, noise_kind="pair", imbalance=5, val_label_noise="same"
    ).resolved()
    assert regime_of(cfg) == Regime(300, 0.2, "pair", 5.0, "same")
    assert regime_of(TrainConfig().resolved()) == Regime()
    assert NOISE_KINDS == ("symmetric", "pair") == CHOICES["noise_kind"]
    assert "regime" in RUN_RECORDS


# -- train_size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "size", "expected"),
    [
        ([50, 30, 20], 10, [5, 3, 2]),  # exact shares
        ([45, 33, 22], 10, [5, 3, 2]),  # 4.5, 3.3, 2.2: the largest remainder rounds up
        ([40, 35, 25], 10, [4, 4, 2]),  # 4, 3.5, 2.5: a tie goes to the lower class
        ([50, 30, 20], 13, [6, 4, 3]),  # 6.5, 3.9, 2.6: remainders .9 and .6 before .5
        ([97, 2, 1], 5, [3, 1, 1]),  # 4.85, .1, .05: one each, the largest class gives back
        ([10, 10, 10], 3, [1, 1, 1]),  # as many as classes
        ([50, 30, 20], 100, [50, 30, 20]),  # everything
        # 0.8, 5.6, 5.6: the class raised to one image gets no more; 13 would be more than
        # class 0's one image, and a subset one short of 12
        ([1, 7, 7], 12, [1, 6, 5]),
        ([9, 16, 25], 5, [1, 2, 2]),  # 0.9, 1.6, 2.5: class 0's one image is its share
    ],
)
def test_train_size_is_exact_and_stratified(counts: list[int], size: int, expected: list[int]):
    assert largest_remainders(counts, size) == expected  # the reference agrees with the table
    data = make_splits(counts)
    out, record = apply_regime(data, Regime(train_size=size), seed=3)
    assert len(out.train) == size == record["train_size"]
    assert kept_counts(data, out) == expected == record["class_counts"]
    assert record["flipped_labels"] == 0 and record["flipped_fraction"] == 0.0
    # the kept items are distinct originals, with their own images and labels, in order
    index = ids(out.train)
    assert np.all(np.diff(index) > 0)
    assert torch.equal(out.train.images, data.train.images[torch.from_numpy(index)])
    assert torch.equal(out.train.labels, data.train.labels[torch.from_numpy(index)])
    assert_untouched(data, out)


@pytest.mark.parametrize(
    ("fraction", "size", "expected"),
    [
        (0.1, 10, [5, 3, 2]),
        (0.25, 25, [13, 7, 5]),  # 12.5, 7.5, 5
        (0.125, 13, [6, 4, 3]),  # 12.5 images round half up
        (0.999, 100, [50, 30, 20]),
        (0.03, 3, [1, 1, 1]),
    ],
)
def test_train_size_as_a_fraction(fraction: float, size: int, expected: list[int]) -> None:
    data = make_splits([50, 30, 20])
    out, record = apply_regime(data, Regime(train_size=fraction), seed=0)
    assert len(out.train) == size == record["train_size"]
    assert kept_counts(data, out) == expected == record["class_counts"]
    assert_untouched(data, out)


def test_the_subset_is_drawn_by_the_seed() -> None:
    data = make_splits([60, 40, 20])
    regime = Regime(train_size=30)

    def picked(seed: int) -> np.ndarray:
        return ids(apply_regime(data, regime, seed)[0].train)

    assert np.array_equal(picked(0), picked(0))
    assert not np.array_equal(picked(0), picked(1))
    for seed in (0, 1):
        assert kept_counts(data, apply_regime(data, regime, seed)[0]) == [15, 10, 5]
    # the seed alone draws it: the global generators do not matter
    torch.manual_seed(123)
    np.random.seed(123)
    first = picked(7)
    torch.manual_seed(456)
    np.random.seed(456)
    assert np.array_equal(first, picked(7))


def test_a_fraction_and_the_same_count_pick_the_same_images() -> None:
    data = make_splits([50, 30, 20])
    by_count = apply_regime(data, Regime(train_size=25), seed=2)[0]
    by_share = apply_regime(data, Regime(train_size=0.25), seed=2)[0]
    assert np.array_equal(ids(by_count.train), ids(by_share.train))


def test_train_size_equal_to_the_split_keeps_everything() -> None:
    data = make_splits([6, 4])
    out, record = apply_regime(data, Regime(train_size=10), seed=0)
    assert np.array_equal(ids(out.train), np.arange(10))
    assert torch.equal(out.train.labels, data.train.labels)
    assert (out.mean, out.std) == (data.mean, data.std)
    assert record["train_size"] == 10


@pytest.mark.slow  # scikit-learn's digits
def test_the_subset_does_not_depend_on_the_optimizer(digits: DataSplits) -> None:
    common = dict(dataset="digits", train_size=300, label_noise=0.2, imbalance=2, seed=1)
    prepared = [
        prepare_data(TrainConfig(**common, optimizer=name).resolved())
        for name in ("adam", "sgd", "gcsam", "sam")
    ]
    first, record = prepared[0]
    assert len(first.train) == 300 and record["flipped_labels"] == 60
    for data, other in prepared[1:]:
        assert torch.equal(data.train.images, first.train.images)
        assert torch.equal(data.train.labels, first.train.labels)
        assert (data.mean, data.std) == (first.mean, first.std)
        assert other == record
    # not vacuous: another seed trains on other images
    reseeded, _ = prepare_data(TrainConfig(**{**common, "seed": 2}).resolved())
    assert not torch.equal(reseeded.train.images, first.train.images)


@pytest.mark.slow  # scikit-learn's digits
def test_prepare_data_without_a_regime_keeps_the_split(digits: DataSplits) -> None:
    data, record = prepare_data(TrainConfig(dataset="digits").resolved())
    assert torch.equal(data.train.images, digits.train.images)
    assert torch.equal(data.train.labels, digits.train.labels)
    assert torch.equal(data.val.labels, digits.val.labels)
    assert torch.equal(data.test.images, digits.test.images)
    assert (data.mean, data.std) == (digits.mean, digits.std)
    assert record == {
        "train_size": 1259,
        "class_counts": digits.train.labels.bincount(minlength=10).tolist(),
        "flipped_labels": 0,
        "flipped_fraction": 0.0,
        "val_label_noise": "clean",
    }


# -- label noise -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "p", "flipped"),
    [(200, 0.3, 60), (10, 0.25, 3), (100, 0.15, 15), (40, 0.01, 0), (40, 0.02, 1), (7, 0.9, 6)],
)
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_exactly_round_p_n_labels_are_wrong(n: int, p: float, flipped: int, kind: str) -> None:
    """round half up: 2.5 wrong labels are 3, 0.4 are none, 0.8 is one, 6.3 are 6."""
    data = make_splits([n - n // 2, n // 2])  # 2 classes: a wrong label is the other one
    out, record = apply_regime(data, Regime(label_noise=p, noise_kind=kind), seed=0)
    clean = data.train.labels
    assert int((out.train.labels != clean).sum()) == flipped
    assert record == {
        "train_size": n,
        "class_counts": [n - n // 2, n // 2],  # of the clean labels
        "flipped_labels": flipped,
        "flipped_fraction": flipped / n,
        "val_label_noise": "clean",
    }
    # the images and their statistics are not changed by noise
    assert torch.equal(out.train.images, data.train.images)
    assert (out.mean, out.std) == (data.mean, data.std)
    assert_untouched(data, out)


def test_symmetric_noise_draws_every_other_class_never_its_own() -> None:
    data = make_splits([250] * 4)
    out, record = apply_regime(data, Regime(label_noise=0.6), seed=0)
    clean, noisy = data.train.labels.numpy(), out.train.labels.numpy()
    changed = noisy != clean
    assert changed.sum() == 600 == record["flipped_labels"]  # so none was "flipped" to itself
    assert record["flipped_fraction"] == 0.6
    pairs = np.zeros((4, 4), dtype=np.int64)
    np.add.at(pairs, (clean[changed], noisy[changed]), 1)
    assert np.all(np.diag(pairs) == 0)
    off = pairs[~np.eye(4, dtype=bool)]
    assert off.sum() == 600 and off.min() >= 25 and off.max() <= 75  # ~50 each, uniformly


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_pair_noise_maps_k_to_the_next_class(classes: int) -> None:
    data = make_splits([40] * classes)
    out, record = apply_regime(data, Regime(label_noise=0.45, noise_kind="pair"), seed=1)
    clean, noisy = data.train.labels, out.train.labels
    changed = noisy != clean
    flipped = math.floor(0.45 * 40 * classes + 0.5)
    assert int(changed.sum()) == flipped == record["flipped_labels"]
    assert torch.equal(noisy[changed], (clean[changed] + 1) % classes)
    assert int((clean[changed] == classes - 1).sum()) > 0  # the wrap-around, K-1 -> 0, occurs


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_same_val_noise_makes_round_p_n_validation_labels_wrong(kind: str) -> None:
    """val_label_noise="same": the validation split gets the training split's rate and kind
    from a stream of its own; the images and the test split are untouched."""
    data = make_splits([60, 60, 60])  # validation: 20 images
    out, record = apply_regime(
        data, Regime(label_noise=0.3, noise_kind=kind, val_label_noise="same"), seed=3
    )
    clean, noisy = data.val.labels, out.val.labels
    changed = noisy != clean
    assert int(changed.sum()) == 6 == record["val_flipped_labels"]  # round(0.3 * 20)
    assert record["val_flipped_fraction"] == 0.3 and record["val_label_noise"] == "same"
    if kind == "pair":
        assert torch.equal(noisy[changed], (clean[changed] + 1) % 3)
    assert out.val.images is data.val.images
    assert out.test.labels is data.test.labels and out.test.images is data.test.images
    # the training split's noise is the one a clean-validation run gets, label for label
    plain, _ = apply_regime(data, Regime(label_noise=0.3, noise_kind=kind), seed=3)
    assert torch.equal(out.train.labels, plain.train.labels)
    assert plain.val.labels is data.val.labels


def test_same_val_noise_without_training_noise_changes_nothing() -> None:
    data = make_splits([30, 20, 10])
    out, record = apply_regime(data, Regime(val_label_noise="same"), seed=0)
    assert_untouched(data, out)
    assert "val_flipped_labels" not in record


def test_val_label_noise_is_checked() -> None:
    with pytest.raises(ValueError, match="val_label_noise must be one of clean, same"):
        Regime(val_label_noise="noisy")
    with pytest.raises(ConfigError, match="val_label_noise"):
        TrainConfig(val_label_noise="noisy").resolved()


def test_zero_noise_changes_nothing() -> None:
    data = make_splits([30, 20, 10])
    for kind in NOISE_KINDS:
        out, record = apply_regime(data, Regime(label_noise=0.0, noise_kind=kind), seed=5)
        assert torch.equal(out.train.labels, data.train.labels)
        assert torch.equal(out.train.images, data.train.images)
        assert (record["flipped_labels"], record["flipped_fraction"]) == (0, 0.0)


def test_noise_is_drawn_by_the_seed() -> None:
    data = make_splits([50, 50, 50])

    def labels(seed: int, kind: str = "symmetric") -> torch.Tensor:
        return apply_regime(data, Regime(label_noise=0.3, noise_kind=kind), seed)[0].train.labels

    assert torch.equal(labels(0), labels(0))
    assert not torch.equal(labels(0), labels(1))
    # both kinds pick the same labels to make wrong (the same stream)
    assert torch.equal(labels(4) != data.train.labels, labels(4, "pair") != data.train.labels)


def test_noise_comes_after_the_subset_and_only_in_train() -> None:
    data = make_splits([100, 60, 40])
    subset, _ = apply_regime(data, Regime(train_size=50), seed=9)
    out, record = apply_regime(data, Regime(train_size=50, label_noise=0.2), seed=9)
    # the same images as without noise: noise has its own stream
    assert np.array_equal(ids(out.train), ids(subset.train))
    assert torch.equal(out.train.images, subset.train.images)
    clean = clean_labels(data, out)
    assert np.array_equal(clean, subset.train.labels.numpy())
    assert int((out.train.labels.numpy() != clean).sum()) == 10  # 0.2 of the 50 kept
    assert record == {
        "train_size": 50,
        "class_counts": [25, 15, 10],  # clean
        "flipped_labels": 10,
        "flipped_fraction": 0.2,
        "val_label_noise": "clean",
    }
    assert (out.mean, out.std) == (subset.mean, subset.std)
    assert_untouched(data, out)


# -- imbalance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "ratio", "expected"),
    [
        ([30] * 5, 10.0, [30, 17, 9, 5, 3]),  # 30 * 10 ** (-k / 4): 16.87, 9.49, 5.33, 3
        ([50, 40, 20], 4.0, [20, 10, 5]),  # n is the smallest class's 20
        ([10, 10, 10], 100.0, [10, 1, 1]),  # 0.1 image: at least one
        ([8, 12], 2.0, [8, 4]),
        ([100] * 4, 8.0, [100, 50, 25, 13]),  # 12.5 rounds half up
    ],
)
def test_imbalance_keeps_a_long_tail(counts: list[int], ratio: float, expected: list[int]):
    assert long_tailed(counts, ratio) == expected
    data = make_splits(counts)
    out, record = apply_regime(data, Regime(imbalance=ratio), seed=0)
    assert kept_counts(data, out) == expected == record["class_counts"]
    assert len(out.train) == sum(expected) == record["train_size"]
    assert torch.equal(out.train.labels, torch.from_numpy(clean_labels(data, out)))  # no noise
    assert record["flipped_labels"] == 0
    assert_untouched(data, out)


def test_imbalance_one_keeps_everything() -> None:
    data = make_splits([9, 6, 3])
    out, record = apply_regime(data, Regime(imbalance=1.0), seed=0)
    assert np.array_equal(ids(out.train), np.arange(18))
    assert torch.equal(out.train.labels, data.train.labels)
    assert (out.mean, out.std) == (data.mean, data.std)
    assert record["class_counts"] == [9, 6, 3]


def test_imbalance_is_drawn_by_the_seed() -> None:
    data = make_splits([40, 40, 40])
    a = apply_regime(data, Regime(imbalance=4.0), seed=0)[0]
    b = apply_regime(data, Regime(imbalance=4.0), seed=1)[0]
    assert kept_counts(data, a) == kept_counts(data, b) == [40, 20, 10]
    assert not np.array_equal(ids(a.train), ids(b.train))
    assert np.array_equal(ids(a.train), ids(apply_regime(data, Regime(imbalance=4.0), 0)[0].train))


@pytest.mark.parametrize(
    ("train_size", "expected"),
    [
        (94, [50, 25, 13, 6]),  # half of (100, 50, 25, 13): 50, 25, 12.5, 6.5
        (0.5, [50, 25, 13, 6]),  # a fraction is of the 188 left after the imbalance
        (20, [11, 5, 3, 1]),  # 10.6, 5.3, 2.7, 1.4
        (4, [1, 1, 1, 1]),
    ],
)
def test_imbalance_then_train_size_keeps_the_proportions(
    train_size: float, expected: list[int]
) -> None:
    data = make_splits([100] * 4)
    size = math.floor(188 * train_size + 0.5) if train_size < 1 else int(train_size)
    assert largest_remainders([100, 50, 25, 13], size) == expected
    out, record = apply_regime(data, Regime(train_size=train_size, imbalance=8.0), seed=0)
    assert kept_counts(data, out) == expected == record["class_counts"]
    assert len(out.train) == sum(expected) == record["train_size"]
    # the subset is drawn from the long tail (the images the imbalance alone keeps)
    tail = apply_regime(data, Regime(imbalance=8.0), seed=0)[0]
    assert set(ids(out.train)) <= set(ids(tail.train))


def test_all_three_together() -> None:
    data = make_splits([100] * 4)
    regime = Regime(train_size=94, label_noise=0.25, noise_kind="pair", imbalance=8.0)
    out, record = apply_regime(data, regime, seed=0)
    clean = clean_labels(data, out)
    changed = out.train.labels.numpy() != clean
    assert changed.sum() == 24  # round(23.5) half up
    assert np.array_equal(out.train.labels.numpy()[changed], (clean[changed] + 1) % 4)
    assert record == {
        "train_size": 94,
        "class_counts": [50, 25, 13, 6],
        "flipped_labels": 24,
        "flipped_fraction": 24 / 94,
        "val_label_noise": "clean",
    }
    assert (out.mean, out.std) == channel_stats(out.train.images)


# -- normalization statistics ------------------------------------------------------------------


def reference_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.to(torch.float64) / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3), unbiased=False).tolist()


@pytest.mark.parametrize(
    "regime", [Regime(train_size=12), Regime(train_size=0.3), Regime(imbalance=3.0)]
)
def test_a_subset_has_the_statistics_of_its_images(regime: Regime) -> None:
    data = make_splits([20, 15, 10], channels=3, side=5)
    # class k's images darker by k, so a subset's statistics differ from the whole's
    data.train.images[data.train.labels == 1] //= 2
    data.train.images[data.train.labels == 2] //= 4
    data.mean, data.std = channel_stats(data.train.images)
    out, _ = apply_regime(data, regime, seed=0)
    assert len(out.train) < len(data.train)
    assert (out.mean, out.std) == channel_stats(out.train.images)
    mean, std = reference_stats(out.train.images)
    assert out.mean == pytest.approx(mean, rel=1e-9) and out.std == pytest.approx(std, rel=1e-9)
    assert out.mean != pytest.approx(data.mean, rel=1e-6)
    assert len(out.mean) == len(out.std) == 3
    # normalize() uses the new statistics
    x = out.normalize(out.train.images)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    # the original is not changed
    assert data.mean != out.mean


def test_statistics_are_kept_when_every_image_is() -> None:
    data = make_splits([20, 15, 10], channels=3)
    data.mean, data.std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # to see they are not recomputed
    for regime in (Regime(label_noise=0.3), Regime(train_size=45), Regime(imbalance=1.0)):
        out, _ = apply_regime(data, regime, seed=0)
        assert (out.mean, out.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "regime", "message"),
    [
        (
            [100, 60, 40],
            Regime(train_size=201),
            "train_size 201 is more than the 200 training images of toy; pass at most 200, "
            "or a fraction",
        ),
        (
            [100, 60, 40],
            Regime(train_size=2),
            "train_size 2 gives 2 training images, fewer than the 3 classes of toy; keep at "
            "least one image per class",
        ),
        (
            [100, 60, 40],
            Regime(train_size=0.01),
            "train_size 0.01 gives 2 training images, fewer than the 3 classes of toy; keep at "
            "least one image per class",
        ),
        (
            [100, 60, 40],
            Regime(train_size=0.001),
            "train_size 0.001 gives 0 training images, fewer than the 3 classes of toy; keep at "
            "least one image per class",
        ),
        (
            [100, 100, 100],
            Regime(train_size=176, imbalance=4.0),  # 100, 50, 25 are left
            "train_size 176 is more than the 175 training images of toy after the "
            "imbalance; pass at most 175, or a fraction",
        ),
        (
            [100, 100, 100],
            Regime(train_size=0.005, imbalance=4.0),  # 175 * 0.005 = 0.875: 1 image
            "train_size 0.005 gives 1 training images, fewer than the 3 classes of toy after "
            "the imbalance; keep at least one image per class",
        ),
    ],
)
def test_impossible_train_sizes_are_data_errors(
    counts: list[int], regime: Regime, message: str
) -> None:
    with pytest.raises(DataError) as caught:
        apply_regime(make_splits(counts), regime, seed=0)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("label_noise", 1.0),
        ("label_noise", 1),
        ("label_noise", -0.1),
        ("label_noise", 1.5),
        ("label_noise", "lots"),
        ("label_noise", math.nan),
        ("label_noise", True),
        ("imbalance", 0.5),
        ("imbalance", 0.999),
        ("imbalance", 0),
        ("imbalance", math.inf),
        ("imbalance", "steep"),
        ("train_size", 2.5),
        ("train_size", 0),
        ("train_size", 0.0),
        ("train_size", -1),
        ("train_size", True),
        ("train_size", 1.5),
        ("train_size", math.inf),
        ("train_size", math.nan),
        ("train_size", "many"),
        ("train_size", [100]),
        ("noise_kind", "uniform"),
        ("noise_kind", "Pair"),
        ("noise_kind", None),
    ],
)
def test_config_refuses_bad_regimes(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**{name: value}).resolved()
    message = str(caught.value)
    assert message.startswith(f"{name} must be ") or message.startswith(f"{name}: "), message
    assert repr(value) in message or str(value) in message


def test_config_error_messages_say_what_is_allowed() -> None:
    def error(**values: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            TrainConfig(**values).resolved()
        return str(caught.value)

    assert error(train_size=2.5) == (
        "train_size must be a number of training images (an integer >= 1) or a fraction in "
        "(0, 1), got 2.5"
    )
    assert error(label_noise=1.0) == "label_noise must be a fraction in [0, 1), got 1.0"
    assert error(imbalance=0.5) == (
        "imbalance must be a ratio >= 1 (largest class / smallest class), got 0.5"
    )
    assert "symmetric" in error(noise_kind="uniform") and "pair" in error(noise_kind="uniform")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("train_size", 500, 500),
        ("train_size", 500.0, 500),  # a count, as an int
        ("train_size", "1e3", 1000),
        ("train_size", 1, 1),
        ("train_size", 0.5, 0.5),
        ("train_size", "0.25", 0.25),
        ("train_size", None, None),
        ("label_noise", 0, 0.0),
        ("label_noise", "0.2", 0.2),
        ("label_noise", 0.999, 0.999),
        ("imbalance", 1, 1.0),
        ("imbalance", "100", 100.0),
        ("noise_kind", "pair", "pair"),
        ("noise_kind", "symmetric", "symmetric"),
    ],
)
def test_config_accepts_and_types_regimes(name: str, value: Any, expected: Any) -> None:
    resolved = getattr(TrainConfig(**{name: value}).resolved(), name)
    assert resolved == expected and type(resolved) is type(expected)


def _flags(*argv: str) -> TrainConfig:
    values, _ = settings(build_parser().parse_args(["train", *argv]), set())
    return TrainConfig(**values).resolved()


def test_the_flags_set_the_regime() -> None:
    cfg = _flags(
        "--train-size", "300", "--label-noise", "0.2", "--noise-kind", "pair", "--imbalance", "5"
    )
    assert (cfg.train_size, cfg.label_noise, cfg.noise_kind, cfg.imbalance) == (
        300,
        0.2,
        "pair",
        5.0,
    )
    assert type(cfg.train_size) is int
    assert _flags("--train-size", "0.1").train_size == 0.1
    default = _flags()
    assert (default.train_size, default.label_noise, default.noise_kind, default.imbalance) == (
        None,
        0.0,
        "symmetric",
        1.0,
    )


def test_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    out = tmp_path / "run"
    for argv, expected in (
        (["--train-size", "2.5"], "train_size must be a number of training images"),
        (["--train-size", "0"], "train_size must be a number of training images"),
        (["--label-noise", "1"], "label_noise must be a fraction in [0, 1), got 1.0"),
        (["--imbalance", "0.5"], "imbalance must be a ratio >= 1"),
    ):
        assert cli.main(["train", *FAST, *argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"gcsam: error: {expected}") and err.count("\n") == 1, err
        assert not out.exists()
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "--noise-kind", "uniform", "--out", str(out)])
    assert caught.value.code == 2
    assert "invalid choice: 'uniform'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # scikit-learn's digits
def test_cli_refuses_a_train_size_larger_than_the_split(
    digits: DataSplits, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--train-size", "100000", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "gcsam: error: train_size 100000 is more than the 1259 training images of digits; "
        "pass at most 1259, or a fraction\n"
    )
    assert captured.out == ""
    assert not out.exists()
    assert len(digits.train) == 1259


# -- a run records its regime ------------------------------------------------------------------


@pytest.mark.slow  # trains
def test_a_run_records_its_regime(digits: DataSplits, tmp_path: Path) -> None:
    out = tmp_path / "run"
    regime = ["--train-size", "300", "--label-noise", "0.2", "--noise-kind", "pair"]
    assert cli.main(["train", *FAST, *regime, "--imbalance", "5", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    counts = digits.train.labels.bincount(minlength=10).tolist()
    tail = long_tailed(counts, 5.0)
    assert tail == [122, 102, 85, 71, 60, 50, 42, 35, 29, 24]  # 122 * 5 ** (-k / 9)
    expected_counts = largest_remainders(tail, 300)
    assert sum(expected_counts) == 300
    assert config["regime"] == {
        "train_size": 300,
        "class_counts": expected_counts,
        "flipped_labels": 60,
        "flipped_fraction": 0.2,
        "val_label_noise": "clean",
    }
    assert config["split_sizes"] == {"train": 300, "val": len(digits.val), "test": len(digits.test)}
    assert (config["train_size"], config["label_noise"], config["noise_kind"]) == (300, 0.2, "pair")
    assert config["imbalance"] == 5.0 and config["model"] == "small-cnn"
    # the record is what prepare_data gives for the run's settings, and the run reads back
    cfg = read_run_config(out)
    assert (cfg.train_size, cfg.label_noise, cfg.noise_kind, cfg.imbalance) == (
        300,
        0.2,
        "pair",
        5.0,
    )
    data, record = prepare_data(cfg.resolved())
    assert record == config["regime"] and len(data.train) == 300
    assert (out / "summary.json").is_file()


# -- default models ----------------------------------------------------------------------------


def test_every_default_model_is_registered() -> None:
    for name, spec in DATASETS.items():
        assert spec.default_model in MODELS, name
    expected = {
        "digits": "small-cnn",
        "image-folder": "small-cnn",
        "mnist": "convnet",
        "fashion-mnist": "convnet",
        "cifar10": "resnet20",
        "cifar100": "resnet20",
    }
    for name, spec in DATASETS.items():
        # the MedMNIST data sets are 28 px like MNIST
        want = expected.get(name, "convnet" if name.endswith("mnist") else None)
        assert spec.default_model == want, name
    assert sum(name.endswith("mnist") for name in DATASETS) >= 4


def test_the_model_defaults_to_the_data_sets() -> None:
    assert TrainConfig().model is None
    assert TrainConfig(dataset="digits").resolved().model == "small-cnn"
    assert TrainConfig(dataset="fashion-mnist").resolved().model == "convnet"
    assert TrainConfig(dataset="mnist").resolved().model == "convnet"
    assert TrainConfig(dataset="pathmnist").resolved().model == "convnet"
    assert TrainConfig(dataset="cifar10").resolved().model == "resnet20"
    for optimizer in ("adam", "sgd", "gcsam"):
        cfg = TrainConfig(dataset="fashion-mnist", optimizer=optimizer).resolved()
        assert cfg.model == "convnet"
    assert _flags("--dataset", "fashion-mnist").model == "convnet"
    assert _flags().model == "small-cnn"


def test_a_named_model_wins() -> None:
    assert TrainConfig(dataset="digits", model="convnet").resolved().model == "convnet"
    assert TrainConfig(dataset="fashion-mnist", model="small-cnn").resolved().model == "small-cnn"
    assert TrainConfig(dataset="cifar10", model="vgg16").resolved().model == "vgg16"
    assert _flags("--dataset", "fashion-mnist", "--model", "resnet20").model == "resnet20"
    with pytest.raises(ConfigError, match=r"^model must be a non-empty string"):
        TrainConfig(model="").resolved()


# -- default epochs ----------------------------------------------------------------------------


def test_the_epochs_default_to_the_data_sets() -> None:
    assert TrainConfig().epochs is None
    for name, spec in DATASETS.items():
        assert spec.default_epochs == (12 if name == "digits" else 20), name
        assert TrainConfig(dataset=name).resolved().epochs == spec.default_epochs
    assert _flags().epochs == 12
    assert _flags("--dataset", "fashion-mnist").epochs == 20
    assert _flags("--epochs", "3").epochs == 3
    assert TrainConfig(dataset="fashion-mnist", epochs=5).resolved().epochs == 5
    with pytest.raises(ConfigError, match=r"^epochs must be"):
        TrainConfig(epochs=0).resolved()


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "12"])
def test_a_data_set_spec_refuses_bad_default_epochs(bad: Any) -> None:
    with pytest.raises(ValueError, match="default_epochs"):
        DatasetSpec(name="x", summary="x", load=lambda *a: None, default_epochs=bad)


def command_help(command: str) -> str:
    """``gcsam COMMAND --help`` as one line of words."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(subparsers.choices[command].format_help().split())


def test_the_help_lists_each_data_sets_default_epochs() -> None:
    lines = registry_help().splitlines()
    for name, spec in DATASETS.items():
        line = next(line for line in lines if line.split()[0] == name)
        assert f"{spec.default_epochs} epochs" in line, line
    train_help = command_help("train")
    assert "epochs (the data set's default, listed below)" in train_help
    assert "digits" in train_help and "12 epochs" in train_help


def test_digits_loads_do_not_share_memory() -> None:
    first = load_dataset("digits", seed=0)
    want = first.train.images.clone(), first.train.labels.clone()
    for split in (first.train, first.val, first.test):
        split.images.zero_()
        split.labels.zero_()
    second = load_dataset("digits", seed=0)
    assert torch.equal(second.train.images, want[0])
    assert torch.equal(second.train.labels, want[1])


# -- convnet -----------------------------------------------------------------------------------


def convnet_parameters(classes: int, channels: int, size: int, width: float = 1.0) -> int:
    """ConvNet's parameters from its layer shapes: 3x3 convs without bias (BN follows), BN
    weight + bias, the flattened map after two ceil-mode 2x2 pools, a bias-free hidden linear
    layer with BN, and the linear head with its bias."""
    c1, c2, hidden = (max(1, round(c * width)) for c in (32, 64, 128))
    side = math.ceil(math.ceil(size / 2) / 2)
    conv1 = channels * c1 * 3 * 3 + 2 * c1
    conv2 = c1 * c2 * 3 * 3 + 2 * c2
    hidden_layer = c2 * side * side * hidden + 2 * hidden
    return conv1 + conv2 + hidden_layer + hidden * classes + classes


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_convnet_has_421866_parameters_on_28px() -> None:
    # 1*32*9 + 64  +  32*64*9 + 128  +  64*7*7*128 + 256  +  128*10 + 10
    assert 288 + 64 + 18_432 + 128 + 401_408 + 256 + 1_280 + 10 == 421_866
    assert convnet_parameters(10, 1, 28) == 421_866
    assert count(build_model("convnet", 10, 1, 28)) == 421_866


@pytest.mark.parametrize("size", [4, 7, 8, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_convnet_shapes(size: int, channels: int) -> None:
    torch.manual_seed(0)
    for classes in (2, 10):
        model = build_model("convnet", classes, channels, size)
        assert count(model) == convnet_parameters(classes, channels, size)
        model.train()
        logits = model(torch.randn(3, channels, size, size))
        assert logits.shape == (3, classes) and torch.isfinite(logits).all()
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(1, channels, size, size)).shape == (1, classes)


@pytest.mark.parametrize(("width", "channels"), [(0.5, (16, 32, 64)), (2.0, (64, 128, 256))])
def test_convnet_width_scales_the_channels(width: float, channels: tuple[int, ...]) -> None:
    c1, c2, hidden = channels
    model = build_model("convnet", 10, 3, 32, width=width)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(c1, 3, 3, 3), (c2, c1, 3, 3)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(hidden, c2 * 8 * 8), (10, hidden)]
    assert count(model) == convnet_parameters(10, 3, 32, width)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_dropout_sits_before_the_head() -> None:
    model = build_model("convnet", 10, 1, 28, dropout=0.3)
    assert isinstance(model.head[0], torch.nn.Dropout) and model.head[0].p == 0.3
    assert isinstance(model.head[-1], torch.nn.Linear)
    assert count(model) == 421_866
    assert not any(
        isinstance(m, torch.nn.Dropout) for m in build_model("convnet", 10, 1, 28).modules()
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("train_size", 2.5, "train_size must be an integer >= 1 or a fraction"),
        ("train_size", 0, "train_size must be an integer >= 1 or a fraction"),
        ("train_size", True, "train_size must be an integer >= 1 or a fraction"),
        ("label_noise", 1.0, "label_noise must be in [0, 1)"),
        ("label_noise", -0.1, "label_noise must be in [0, 1)"),
        ("noise_kind", "uniform", "noise_kind must be one of symmetric, pair"),
        ("imbalance", 0.5, "imbalance must be >= 1"),
        ("imbalance", math.nan, "imbalance must be >= 1"),
    ],
)
def test_a_regime_built_directly_checks_its_fields(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Regime(**{field: value})


def test_label_noise_on_one_class_is_refused() -> None:
    data = make_splits([6])
    with pytest.raises(DataError, match="label_noise needs at least 2 classes"):
        apply_regime(data, Regime(label_noise=0.5), seed=0)
