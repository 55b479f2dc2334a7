"""Markdown tables that also read well as plain text, and the paired differences they show."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .stats import PairedTest


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """A Markdown table padded to column width, so that it also reads well as plain text;
    ``align`` holds ``l`` or ``r`` per column."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align, strict=True)
    ]
    return [line(header), line(rule), *(line(row) for row in rows)]


def difference_text(test: PairedTest, scale: float = 100.0, spec: str = "+.2f") -> str:
    """A paired difference and its confidence interval, each times ``scale`` in format
    ``spec``: ``+1.20 [+0.35, +2.05]`` (points, by default); the interval is left out where it
    is undefined (fewer than 2 pairs)."""
    text = format(scale * test.diff, spec)
    if math.isfinite(test.ci_low) and math.isfinite(test.ci_high):
        text += f" [{scale * test.ci_low:{spec}}, {scale * test.ci_high:{spec}}]"
    return text
