"""Progress bars for long work outside the training loop (decoding a data set, predicting a test set, drawing CAMs),
in the style of Lightning's TQDM bar, on stderr, shown only on a terminal (logs and CI stay clean)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "img") -> Iterator[T]:
    """``items``, with a bar that counts them (``total`` when ``items`` has no length)."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, disable=None))
