"""The one progress bar of gcsam: tqdm on stderr when it is installed, nothing otherwise."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class _NoBar:
    """What :func:`progress_bar` returns when nothing is shown: the calls tqdm takes, doing
    nothing, and iteration over the wrapped iterable."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def set_description(self, text: str = "", refresh: bool = True) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(iterable: Iterable[Any] | None = None, *, show: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``); ``kwargs`` go to tqdm.

    ``show=None`` shows it only when stderr is a terminal and tqdm is installed, ``False``
    never; ``True`` needs tqdm (``pip install tqdm``) and says so if it is missing.
    """
    if show is False:
        return _NoBar(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if show:
            raise ImportError(
                "progress bars need tqdm: pip install tqdm (or pass progress=False)"
            ) from None
        return _NoBar(iterable)
    return tqdm(iterable, disable=None if show is None else not show, dynamic_ncols=True, **kwargs)
