"""The model registry: one :class:`ModelSpec` per classifier, filled by :func:`register_model`.

To add a model:

1. write the ``nn.Module`` in a family file (``cnn.py``, ``resnet.py``, ... or a new one);
2. decorate its builder ``fn(num_classes, in_channels, image_size, *, width, dropout, **options)``
   with ``@register_model("name", summary="one line for --help", options=(...), aliases=(...))``;
3. import the family file in ``models/__init__.py`` (import order is :data:`MODELS` order).

:func:`build_model` validates the common arguments, resolves the name and rejects options the
model does not take; each builder checks and defaults its own options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..._util.validate import check_int, check_number

__all__ = ["MODELS", "OPTIONS", "ModelSpec", "build_model", "describe_model", "register_model"]

# Model-specific keyword arguments of build_model, in the order they are checked.
OPTIONS: tuple[str, ...] = ("depth", "patch_size", "widen_factor")

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A registered classifier: canonical ``name``, one-line ``summary``, the :data:`OPTIONS` it
    takes, extra ``aliases`` and the ``builder`` that constructs it."""

    name: str
    summary: str
    options: tuple[str, ...]
    aliases: tuple[str, ...]
    builder: Builder


# Canonical name -> spec, in registration order; the single source of names and aliases.
MODELS: dict[str, ModelSpec] = {}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_model(
    name: str,
    *,
    summary: str,
    options: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` as model ``name`` (see the module docstring).

    Raises ``ValueError`` if ``name`` or an alias is taken (as a name or an alias), is not in
    normalized form (lowercase, ``-`` not ``_``), or an option is not one of :data:`OPTIONS`.
    """
    taken = {key for spec in MODELS.values() for key in (spec.name, *spec.aliases)}
    for key in (name, *aliases):
        if key != _normalize(key):
            raise ValueError(f"model name or alias {key!r} must be lowercase with '-', not '_'")
        if key in taken:
            raise ValueError(f"model name or alias {key!r} is already registered")
        taken.add(key)
    for option in options:
        if option not in OPTIONS:
            raise ValueError(f"unknown model option {option!r}; valid: {', '.join(OPTIONS)}")
    if "\n" in summary or not summary.strip():
        raise ValueError(f"summary of {name!r} must be one non-empty line")

    def decorate(builder: Builder) -> Builder:
        MODELS[name] = ModelSpec(name, summary, tuple(options), tuple(aliases), builder)
        return builder

    return decorate


def _resolve(name: str) -> ModelSpec:
    """The spec registered as ``name`` or an alias of it (case and ``_``/``-`` insensitive)."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, one of {', '.join(MODELS)}; got {name!r}")
    key = _normalize(name)
    for spec in MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODELS)}")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    width: float = 1.0,
    depth: int | None = None,
    patch_size: int | None = None,
    widen_factor: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Build classifier ``name`` (a key of :data:`MODELS` or an alias) for square ``image_size``
    inputs: ``(N, in_channels, image_size, image_size) -> (N, num_classes)``.

    ``width`` scales every channel count (and the ViT's dim). ``depth``, ``patch_size`` and
    ``widen_factor`` go to the models whose spec lists them (``None``: the model's default);
    other models reject them. ``dropout`` is placed by each model (see its family module).

    The weights come from torch's global generator: the same ``torch.manual_seed`` builds the
    same model. Raises ``ValueError`` naming the argument for invalid arguments.
    """
    spec = _resolve(name)
    num_classes = check_int("num_classes", num_classes, 2)
    in_channels = check_int("in_channels", in_channels, 1)
    image_size = check_int("image_size", image_size, 4)
    width = check_number("width", width)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    given = {"depth": depth, "patch_size": patch_size, "widen_factor": widen_factor}
    for option in OPTIONS:
        if given[option] is not None and option not in spec.options:
            owners = ", ".join(n for n, s in MODELS.items() if option in s.options)
            raise ValueError(f"{option} applies only to {owners}, not {spec.name}")
    options = {option: given[option] for option in spec.options}
    return spec.builder(
        num_classes, in_channels, image_size, width=width, dropout=float(dropout), **options
    )


def describe_model(model: nn.Module) -> dict[str, int]:
    """``{"parameters": total element count, "tensors": number of parameter tensors}`` (shared
    parameters counted once)."""
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params), "tensors": len(params)}
