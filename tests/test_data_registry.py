"""The data set registry: names, specs, registration, argument checks, and ``digits``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import coded_images, register_toys, toy_spec

from gcsam.toolkit.data import (
    AUGMENTATIONS,
    DATASETS,
    DataError,
    DatasetSpec,
    load_dataset,
    register_dataset,
)
from gcsam.toolkit.data.medmnist import MEDMNIST_DATASETS
from gcsam.toolkit.data.registry import refuse_dataset

# Natural or medical photographs, where a crop or a mirror image is still the class.
PHOTOS = {"cifar10", "cifar100", "image-folder"}


def test_names_in_help_order() -> None:
    assert list(DATASETS) == [
        "digits",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "image-folder",
        *MEDMNIST_DATASETS,
    ]
    assert {"breastmnist", "pneumoniamnist", "bloodmnist", "organamnist"} <= set(DATASETS)
    assert all(spec.name == name for name, spec in DATASETS.items())


def test_every_spec_says_what_it_is_and_how_to_get_it() -> None:
    for name, spec in DATASETS.items():
        assert isinstance(spec, DatasetSpec)
        assert spec.summary and "\n" not in spec.summary, name
        assert spec.default_augment in AUGMENTATIONS, name
        assert spec.default_augment == ("crop+flip" if name in PHOTOS else "none"), name
        if name != "digits":  # the only one without files
            assert spec.expected and "--data-dir" in spec.how_to_get, name
    assert "/usr/share/datasets/fashion-mnist" in DATASETS["fashion-mnist"].summary


def test_register_dataset_refuses_a_taken_name(monkeypatch: pytest.MonkeyPatch) -> None:
    digits = DATASETS["digits"]
    with pytest.raises(ValueError, match="'digits' is taken"):
        register_dataset(toy_spec("digits", {"train": (coded_images(4, 1, 2, 2), np.zeros(4))}))
    with pytest.raises(ValueError, match="'chestmnist' is taken"):
        register_dataset(toy_spec("chestmnist", {"train": (coded_images(4, 1, 2, 2), np.zeros(4))}))
    assert DATASETS["digits"] is digits and "chestmnist" not in DATASETS
    with pytest.raises(ValueError, match="cannot also be refused"):
        refuse_dataset("mnist", "no reason")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="lower case"):
        toy_spec("Toy", {"train": (coded_images(4, 1, 2, 2), np.zeros(4))})
    with pytest.raises(ValueError, match="default_augment must be one of none, crop"):
        DatasetSpec(name="toy", summary="s", load=DATASETS["digits"].load, default_augment="x")
    assert DATASETS["mnist"].display == "MNIST" and DATASETS["breastmnist"].display == "breastmnist"


def test_registered_data_set_loads_by_any_case(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    images, labels = coded_images(30, 1, 3, 3), np.arange(30) % 3
    register_toys(monkeypatch, toy_spec("toy", {"train": (images, labels)}))
    data = load_dataset(" TOY ", tmp_path)
    assert data.name == "toy" and data.class_names == ["class-0", "class-1", "class-2"]
    assert data.source == f"memory:{tmp_path}"  # the loader got data_dir as a Path
    assert len(data.train) + len(data.val) + len(data.test) == 30
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    assert str(err.value).endswith(", ".join([*DATASETS, "toy"]))  # every name, the new one too


def test_refused_names_say_why(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not supported: ChestMNIST is multi-label"):
        load_dataset("chestmnist", tmp_path)
    with pytest.raises(ValueError, match="3-D MedMNIST volumes"):
        load_dataset("OrganMNIST3D", tmp_path)
    with pytest.raises(TypeError, match="must be a str"):
        load_dataset(None)  # type: ignore[arg-type]


def test_default_folder_is_named_when_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match="looked in the default") as err:
        load_dataset("breastmnist")
    assert str(tmp_path / ".medmnist") in str(err.value)
    with pytest.raises(DataError, match=r"CIFAR-10 needs a data directory: expected") as err:
        load_dataset("cifar10")
    assert "cifar.html" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "imagenet"}, "valid names: digits, mnist"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"folds": 1}, "folds"),
        ({"folds": 3, "fold": 3}, r"fold must be in 0\.\.2"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"fold": -1, "folds": 2}, "fold must be in"),
    ],
)
def test_argument_validation(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name", "digits")
    with pytest.raises(ValueError, match=match):
        load_dataset(name, **kwargs)


@pytest.mark.slow  # importing scikit-learn takes ~2 s
def test_digits_stratified_and_complete() -> None:
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    splits = (data.train, data.val, data.test)
    assert sum(len(s) for s in splits) == 1797
    assert int(data.train.images.max()) == 255
    # The union is exactly the data set (as a multiset of image + label).
    digits = load_digits()
    original = np.rint(digits.images * 255 / 16).astype(np.uint8)
    want = Counter((img.tobytes(), int(y)) for img, y in zip(original, digits.target, strict=True))
    got = Counter(
        (img.numpy().tobytes(), int(y))
        for s in splits
        for img, y in zip(s.images[:, 0], s.labels, strict=True)
    )
    assert got == want
    # Stratified: each class's share of each split is within one image of its proportion.
    per_class = np.bincount(digits.target)
    for split, share in ((data.val, 0.1), (data.test, 0.2)):
        counts = split.labels.bincount(minlength=10).numpy()
        assert np.all(np.abs(counts - share * per_class) <= 1)
