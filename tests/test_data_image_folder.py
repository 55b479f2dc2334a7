"""``image-folder``: PNG / JPEG class folders in the BUSI and COVID-19 Radiography layouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_helpers import check_partition

from gcsam.toolkit.data import DataError, Split, load_dataset


def save_coded(path: Path, index: int, mode: str, size: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A PNG/JPEG whose first two pixels of the first channel encode ``index``; returns the
    (3, H, W) uint8 array a loader should read back (grayscale repeated)."""
    from PIL import Image

    rng = np.random.default_rng(index)
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 1, 0] = index // 256, index % 256
    # Best-quality 4:4:4 JPEG: still lossy, but close enough to tell the images apart.
    options = {"quality": 100, "subsampling": 0} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path, **options)
    return np.repeat(pixels, 3 // channels, axis=2).transpose(2, 0, 1)


@pytest.fixture
def busi(tmp_path: Path) -> dict:
    """BUSI layout: benign/ (grayscale PNG), malignant/ (RGB PNG), normal/ (JPEG), with masks."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    expected: dict[int, tuple[np.ndarray, int]] = {}
    index = 0
    for label, (name, mode, ext, count) in enumerate(
        [("benign", "L", "png", 10), ("malignant", "RGB", "png", 10), ("normal", "RGB", "jpg", 5)]
    ):
        (root / name).mkdir(parents=True)
        for i in range(count):
            expected[index] = (save_coded(root / name / f"{name} ({i}).{ext}", index, mode), label)
            save_coded(root / name / f"{name} ({i})_mask.png", 900 + index, "L")
            index += 1
        save_coded(root / name / f"{name} (0)_mask_1.png", 999, "L")
    (root / "notes.txt").write_text("not a class")
    return {"root": root, "expected": expected, "n": index}


def folder_ids(split: Split, busi: dict) -> np.ndarray:
    """Which fixture image each loaded one is: the nearest (JPEG is lossy, so not exact)."""
    keys = sorted(busi["expected"])
    bank = torch.from_numpy(np.stack([busi["expected"][k][0] for k in keys])).float()
    dist = (split.images.float()[:, None] - bank[None]).abs().mean((2, 3, 4))
    return np.asarray(keys)[dist.argmin(1).numpy()]


def test_image_folder_busi(busi: dict) -> None:
    data = load_dataset("image-folder", busi["root"], image_size=16, seed=3)
    assert data.class_names == ["benign", "malignant", "normal"]
    assert data.image_shape == (3, 16, 16)
    parts = [folder_ids(s, busi) for s in (data.train, data.val, data.test)]
    check_partition(parts, busi["n"])  # every image once; and 25 images means no mask
    for split, part in zip((data.train, data.val, data.test), parts, strict=True):
        for image, label, i in zip(split.images, split.labels, part, strict=True):
            pixels, expected_label = busi["expected"][int(i)]
            assert int(label) == expected_label
            if expected_label != 2:  # PNG is lossless; JPEG is not
                np.testing.assert_array_equal(image.numpy(), pixels)
            else:
                assert np.abs(image.numpy().astype(int) - pixels).mean() < 5
    # Every class in every split (5..10 images per class, 70 / 10 / 20).
    for split in (data.train, data.val, data.test):
        assert split.labels.bincount(minlength=3).min() >= 1
    default = load_dataset("image-folder", busi["root"])
    assert default.image_shape == (3, 64, 64)  # the default size


def test_image_folder_covid_layout(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for k, name in enumerate(["Viral Pneumonia", "COVID", "Normal"]):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        for i in range(6):
            save_coded(root / name / "images" / f"{name}-{i}.png", 10 * k + i, "L", (20, 12))
            save_coded(root / name / "masks" / f"{name}-{i}.png", 200 + i, "L")
    (root / "COVID.metadata.xlsx").write_bytes(b"")
    data = load_dataset("image-folder", root, image_size=8)
    assert data.class_names == ["COVID", "Normal", "Viral Pneumonia"]
    assert len(data.train) + len(data.val) + len(data.test) == 18
    assert data.image_shape == (3, 8, 8)


def test_image_folder_16_bit_png(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    values = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    for folder in ("a", "b"):
        for i in range(3):
            Image.fromarray(values).save(tmp_path / folder / f"{i}.png")
    data = load_dataset("image-folder", tmp_path, image_size=2)
    image = data.train.images[0]
    assert image[0].tolist() == [[0, 100], [255, 7]] and torch.equal(image[0], image[2])


def test_image_folder_errors(busi: dict, tmp_path: Path) -> None:
    bad = busi["root"] / "benign" / "benign (3).png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match="cannot read image") as err:
        load_dataset("image-folder", busi["root"])
    assert os.path.abspath(bad) in str(err.value)
    good = busi["root"] / "benign" / "benign (4).png"
    good.write_bytes(good.read_bytes()[:60])  # truncated
    bad.unlink()
    with pytest.raises(DataError, match="cannot read image") as err:
        load_dataset("image-folder", busi["root"])
    assert os.path.abspath(good) in str(err.value)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x_mask.png").write_bytes(b"")
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("image-folder", empty)
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset("image-folder", empty / "a")
    with pytest.raises(DataError, match="needs a data directory"):
        load_dataset("image-folder")
