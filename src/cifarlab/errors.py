"""User-facing errors: the CLI prints them as one line (``cifarlab: error: ...``) and exits with status 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class CifarlabError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do, on one line."""


class DataError(CifarlabError):
    """A problem with the data: missing or malformed folders, unreadable images, failed downloads."""


class ConfigError(CifarlabError, ValueError):
    """Options that do not work together."""


@contextlib.contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Turn a missing optional dependency, imported in the block, into a one-line error saying what to install."""
    try:
        yield
    except ImportError as err:
        raise CifarlabError(f"this command needs the {extra} extras ({err.name} is missing): "
                            f"pip install -e '.[{extra}]'") from None
