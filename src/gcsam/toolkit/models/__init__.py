"""Image classifiers in plain torch for the experiment toolkit.

Every model maps ``(N, in_channels, image_size, image_size)`` to logits ``(N, num_classes)`` and
ends in a linear layer named ``head``. Build one with :func:`build_model`; :data:`MODELS` lists
them with a one-line summary each, and :mod:`.registry` says how to add one. The family modules
(``cnn``, ``resnet``, ``vgg``, ``wrn``, ``vit``) hold the design notes.
"""

from __future__ import annotations

# Importing a family module registers its models; this order is MODELS' order.
from . import cnn, resnet, vgg, wrn, vit  # noqa: F401  # isort: skip
from .registry import MODELS, ModelSpec, build_model, describe_model, register_model
from .resnet import IMAGENET_STEM_MIN_SIZE
from .vit import default_patch_size

__all__ = [
    "IMAGENET_STEM_MIN_SIZE",
    "MODELS",
    "ModelSpec",
    "build_model",
    "default_patch_size",
    "describe_model",
    "register_model",
]
