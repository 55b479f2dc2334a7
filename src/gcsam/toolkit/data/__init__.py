"""In-memory image data sets for the experiment toolkit: a registry of loaders (nothing is ever
downloaded), seeded stratified splits, batching and augmentation.

See :mod:`.registry` for how to add a data set.
"""

from ._common import DataError, Raw
from .augment import AUGMENTATIONS, Augment
from .regimes import NOISE_KINDS, VAL_LABEL_NOISE, Regime, apply_regime, regime_of
from .registry import DATASETS, DatasetSpec, load_dataset, register_dataset
from .splits import DataSplits, Split, iterate_batches, select_classes

# Each source module registers its data sets when imported, so this order is DATASETS' order,
# the order of --help.
# isort: off
from . import digits, idx, cifar, image_folder, medmnist  # noqa: F401
# isort: on

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "NOISE_KINDS",
    "VAL_LABEL_NOISE",
    "Augment",
    "DataError",
    "DataSplits",
    "DatasetSpec",
    "Raw",
    "Regime",
    "Split",
    "apply_regime",
    "iterate_batches",
    "load_dataset",
    "regime_of",
    "register_dataset",
    "select_classes",
]
