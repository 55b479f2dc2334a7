"""Splitting, statistics, class selection and batching, on in-memory data sets registered for
the test (the file formats have their own ``test_data_<format>.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_helpers import (
    assert_same_splits,
    check_partition,
    check_round_trip,
    coded_images,
    ids,
    register_toys,
    toy_spec,
)

from gcsam.toolkit.data import (
    DataError,
    DataSplits,
    Split,
    iterate_batches,
    load_dataset,
    select_classes,
)

TRAIN, TEST = 200, 50


@pytest.fixture
def official(monkeypatch: pytest.MonkeyPatch) -> dict:
    """``toy-official``: 200 train and 50 official test images, 10 classes, like MNIST;
    ``toy-rgb``: the same with 3 channels."""
    parts = {
        "train": (coded_images(TRAIN, 1, 6, 5, seed=1), np.arange(TRAIN) % 10),
        "test": (coded_images(TEST, 1, 6, 5, seed=2), np.arange(TEST) % 10),
    }
    rgb = {k: (coded_images(len(y), 3, 4, 4, seed=3), y) for k, (_, y) in parts.items()}
    register_toys(monkeypatch, toy_spec("toy-official", parts), toy_spec("toy-rgb", rgb))
    return parts


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> dict:
    """``toy-pool``: 25 images of 3 classes (10, 10, 5) and no official split, like BUSI."""
    labels = np.repeat([0, 1, 2], [10, 10, 5])
    parts = {"train": (coded_images(25, 1, 4, 4), labels)}
    register_toys(monkeypatch, toy_spec("toy-pool", parts))
    return parts


def test_official_test_kept_and_val_stratified(official: dict) -> None:
    data = load_dataset("toy-official")
    np.testing.assert_array_equal(check_round_trip(data.test, *official["test"]), np.arange(TEST))
    train = check_round_trip(data.train, *official["train"])
    check_partition([train, check_round_trip(data.val, *official["train"])], TRAIN)
    assert data.val.labels.bincount(minlength=10).tolist() == [2] * 10  # 0.1 of 20 per class


def test_pool_split_70_10_20_with_every_class_everywhere(pool: dict) -> None:
    data = load_dataset("toy-pool")
    parts = [check_round_trip(s, *pool["train"]) for s in (data.train, data.val, data.test)]
    check_partition(parts, 25)
    assert [len(p) for p in parts] == [17, 3, 5]
    for split in (data.train, data.val, data.test):
        assert split.labels.bincount(minlength=3).min() >= 1


def test_splits_deterministic_and_seeded(official: dict) -> None:
    a = load_dataset("toy-official", seed=7)
    assert_same_splits(a, load_dataset("toy-official", seed=7))
    b = load_dataset("toy-official", seed=8)
    assert not np.array_equal(ids(a.val), ids(b.val))
    assert torch.equal(a.test.images, b.test.images)  # the official test split never moves


def test_kfold_partitions_pool_and_keeps_test(official: dict) -> None:
    vals = []
    for k in range(5):
        data = load_dataset("toy-official", folds=5, fold=k, seed=1)
        train, val = ids(data.train), ids(data.val)
        check_partition([train, val], TRAIN)
        assert data.val.labels.bincount(minlength=10).tolist() == [4] * 10
        np.testing.assert_array_equal(ids(data.test), np.arange(TEST))
        vals.append(val)
    check_partition(vals, TRAIN)  # the folds are disjoint and cover the pool


def test_kfold_without_official_test(pool: dict) -> None:
    plain = load_dataset("toy-pool", seed=2)
    folds = [load_dataset("toy-pool", seed=2, folds=3, fold=k) for k in range(3)]
    pooled = np.sort(np.concatenate([ids(plain.train), ids(plain.val)]))
    for data in folds:
        # The test split is the same with and without folds, for the same seed.
        np.testing.assert_array_equal(ids(data.test), ids(plain.test))
        np.testing.assert_array_equal(
            np.sort(np.concatenate([ids(data.train), ids(data.val)])), pooled
        )
    vals = np.concatenate([ids(d.val) for d in folds])
    np.testing.assert_array_equal(np.sort(vals), pooled)
    with pytest.raises(ValueError, match="folds=30 is more than the 20 pooled images"):
        load_dataset("toy-pool", folds=30)


def test_mean_std_and_normalize(official: dict) -> None:
    data = load_dataset("toy-rgb")
    # np.testing, not torch.testing: the latter's first call imports for ~2 s.
    x = data.train.images.double().numpy() / 255
    np.testing.assert_allclose(data.mean, x.mean((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(data.std, x.std((0, 2, 3)), rtol=1e-12)
    batch = data.test.images[:4]
    out = data.normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    mean = torch.tensor(data.mean).view(3, 1, 1)
    std = torch.tensor(data.std).view(3, 1, 1)
    np.testing.assert_allclose(out.numpy(), ((batch.float() / 255 - mean) / std).numpy(), 1e-6)
    assert torch.equal(data.normalize(batch[0]), out[0])
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(batch.float())
    with pytest.raises(ValueError, match="3, H, W"):
        data.normalize(batch[:, :1])


def test_constant_channel_gets_std_one(monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.full((10, 1, 2, 2), 51, dtype=np.uint8)
    register_toys(monkeypatch, toy_spec("toy-flat", {"train": (images, np.arange(10) % 2)}))
    data = load_dataset("toy-flat")
    assert data.mean == pytest.approx((0.2,)) and data.std == (1.0,)


def test_split_validation() -> None:
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    assert len(Split(images, torch.zeros(3, dtype=torch.int64))) == 3
    with pytest.raises(ValueError, match="uint8"):
        Split(images.float(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(images, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        Split(images, torch.zeros(2, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# select_classes
# --------------------------------------------------------------------------------------------


def test_select_classes_keeps_and_relabels() -> None:
    def split(labels: list[int]) -> Split:
        images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        return Split(images.contiguous(), torch.tensor(labels))

    splits = DataSplits(
        "toy",
        split([0, 1, 2, 2, 1]),
        split([2, 0]),
        split([1, 2]),
        ["benign", "malignant", "normal"],
        (0.5,),
        (0.1,),
    )
    kept = select_classes(splits, ["normal", "benign"])
    assert kept.class_names == ["normal", "benign"] and kept.num_classes == 2
    assert kept.train.labels.tolist() == [1, 0, 0]
    assert kept.train.images[:, 0, 0, 0].tolist() == [0, 2, 3]
    assert kept.val.labels.tolist() == [0, 1]
    assert kept.test.labels.tolist() == [0]
    assert (kept.mean, kept.std) == (splits.mean, splits.std)
    assert splits.class_names == ["benign", "malignant", "normal"]  # the input is untouched
    with pytest.raises(DataError, match="covid") as err:
        select_classes(splits, ["covid", "normal"])
    assert str(err.value).startswith("classes ['covid'] are not in data set 'toy'")
    assert "['benign', 'malignant', 'normal']" in str(err.value)  # lists what there is


# iterate_batches
# --------------------------------------------------------------------------------------------


def make_split(n: int) -> Split:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Split(images, torch.arange(n))


def test_iterate_batches_covers_each_index_once() -> None:
    split = make_split(23)
    batches = list(
        iterate_batches(split, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    )
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    for images, labels in batches:  # images travel with their labels
        assert images.dtype == torch.uint8 and torch.equal(images[:, 0, 0, 0].long(), labels)
    plain = torch.cat([y for _, y in iterate_batches(split, 5, shuffle=False)])
    assert plain.tolist() == list(range(23))
    dropped = list(iterate_batches(split, 5, shuffle=False, drop_last=True))
    assert [len(y) for _, y in dropped] == [5, 5, 5, 5]


def test_iterate_batches_indices_and_resume() -> None:
    split = make_split(23)
    shard = torch.tensor([4, 0, 22, 9, 9 - 1])
    got = torch.cat([y for _, y in iterate_batches(split, 2, shuffle=True, indices=shard)])
    assert got.tolist() == shard.tolist()  # indices override shuffling
    with pytest.raises(ValueError, match="indices must be in"):
        iterate_batches(split, 2, shuffle=False, indices=torch.tensor([23]))
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(split, 0, shuffle=False)

    gen = torch.Generator().manual_seed(123)
    saved = gen.get_state()
    first = torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=gen)])
    second = torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=gen)])
    assert first.tolist() != second.tolist()  # a new order every epoch
    resumed = torch.Generator()
    resumed.set_state(saved)
    again = torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=resumed)])
    assert again.tolist() == first.tolist()
    # The permutation is drawn at the call, not at the first batch.
    gen.set_state(saved)
    iterate_batches(split, 4, shuffle=True, generator=gen)
    assert not torch.equal(gen.get_state(), saved)
