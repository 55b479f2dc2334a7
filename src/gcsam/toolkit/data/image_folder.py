"""``image-folder``: ``<data_dir>/<class>/*.png`` (the BUSI and COVID-19 Radiography layouts)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._common import DataError, Raw, abs_path
from .registry import DatasetSpec, register_dataset

_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_DEFAULT_SIZE = 64  # the side without an image_size: full-size scans are slow on CPU
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (~9,459 px square)


def _load_image_folder(spec: DatasetSpec, data_dir: Path | None, image_size: int | None) -> Raw:
    root = spec.folder(data_dir)
    size = image_size or _DEFAULT_SIZE
    files, labels, classes = _list_images(spec, root)
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    # Pillow releases the GIL while decoding and resizing, so threads overlap real work.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, image in enumerate(pool.map(lambda p: _read_image(p, size), files)):
            images[i] = image
    return Raw({"train": (images, np.asarray(labels, dtype=np.int64))}, classes, abs_path(root))


def _list_images(spec: DatasetSpec, root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their labels and the sorted class names.

    A class folder's images are its own files or, when it has an ``images/`` subfolder (the
    COVID-19 Radiography layout), that folder's; ``masks/`` subfolders and any file whose name
    contains ``_mask`` (BUSI's ``x_mask.png``, ``x_mask_1.png``) are segmentation masks, skipped.
    """
    classes = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"
    )
    if not classes:
        raise DataError(
            f"image folder {abs_path(root)} has no class subfolders; expected {spec.expected}. "
            f"{spec.how_to_get}"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        source = folder / "images" if (folder / "images").is_dir() else folder
        found = sorted(
            p
            for p in source.iterdir()
            if p.is_file()
            and p.suffix.lower() in _SUFFIXES
            and not p.name.startswith(".")
            and "_mask" not in p.stem.lower()
        )
        if not found:
            raise DataError(
                f"class folder {abs_path(source)} holds no images (.png/.jpg/.jpeg/.bmp/.tif, "
                f"masks excluded); expected {spec.expected}"
            )
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``(3, size, size)`` RGB (grayscale repeated), bilinear resize."""
    from PIL import Image  # lazy: only image folders need Pillow

    try:
        # Image.open reads the header only; Pillow's own bomb check (on unless a program set
        # Image.MAX_IMAGE_PIXELS = None) refuses past twice MAX_PIXELS, ours at MAX_PIXELS.
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(
                    f"image {abs_path(path)} is {img.width} x {img.height} pixels, more than the "
                    f"{MAX_PIXELS:,}-pixel limit (a decompression bomb?); refused before decoding"
                )
            img.load()  # decode now so a truncated file fails here, naming the file
            if img.mode in _SIXTEEN_BIT_MODES:
                # 16-bit grayscale: convert("RGB") would clip, so scale to 8 bits first.
                a = np.asarray(img).astype(np.float64)
                if img.mode != "I" or a.max() > 255:
                    a = a / 257.0
                img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise DataError(f"cannot read image {abs_path(path)}: {e}") from e
    return array.transpose(2, 0, 1)


register_dataset(
    DatasetSpec(
        name="image-folder",
        summary="one subfolder of images per class, e.g. BUSI or COVID-19 Radiography "
        f"(--data-dir required; {_DEFAULT_SIZE} px unless --image-size)",
        load=_load_image_folder,
        default_augment="crop+flip",
        display="image folder",
        expected="one subfolder per class holding .png/.jpg/.jpeg/.bmp/.tif images "
        "(<data-dir>/<class>/*.png or <data-dir>/<class>/images/*.png)",
        how_to_get="Pass --data-dir pointing at the class folders, e.g. BUSI's "
        "Dataset_BUSI_with_GT (benign/, malignant/, normal/) or the COVID-19 Radiography "
        "Database's COVID-19_Radiography_Dataset (COVID/, Normal/, Viral Pneumonia/)",
    )
)
