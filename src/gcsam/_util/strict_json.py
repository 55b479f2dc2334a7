"""Strict JSON values for every file gcsam writes."""

from __future__ import annotations

import math
from typing import Any


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None and tuples by lists: strict JSON has
    no NaN (an undefined ROC AUC, say), and ``json.dumps(..., allow_nan=False)`` then accepts it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
