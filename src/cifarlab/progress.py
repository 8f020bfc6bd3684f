"""Progress bars for long work outside the training loop (decoding a data set, predicting a test set, drawing CAMs),
in the style of Lightning's TQDM bar, on stderr, shown only on a terminal (logs and CI stay clean)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
Report = Callable[[int, int], None]  # (done, total): progress of a long step, for a page as well as a terminal


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "img") -> Iterator[T]:
    """``items``, with a bar that counts them (``total`` when ``items`` has no length)."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, disable=None))


def steps(total: int, desc: str | None, report: Report | None = None, batch: int = 1):
    """``range(0, total, batch)`` with a terminal bar (``desc``) and ``report(done, total)`` after each step."""
    starts = range(0, total, batch)
    for start in progress(starts, desc, unit="batch") if desc else starts:
        yield start
        if report is not None:
            report(min(start + batch, total), total)
