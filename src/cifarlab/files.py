"""Files written so that a crash, a Ctrl-C or a reader at the same moment never sees half of one.

Every cache, report and prediction file of cifarlab goes through ``atomic_path``: write to a temporary name in
the same folder, then ``os.replace`` it into place (atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; moved onto ``path`` when the block ends without an error, removed
    otherwise. ``suffix`` keeps an extension some writers insist on (``np.savez`` appends ``.npz`` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(data: dict, path: str | Path) -> Path:
    """``data`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


def save_npz(path: str | Path, **arrays) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def save_predictions(path: str | Path, probs: np.ndarray, labels: np.ndarray, classes: list[str],
                     ckpt_path: str | Path, weights: str = "") -> Path:
    """Test-set class probabilities ``(N, K)`` (float16), true labels, the checkpoint they came from and a digest
    of its weights (``weights``: lets another checkpoint file with the same weights, ``last.ckpt``, reuse them)."""
    return save_npz(path, probs=np.asarray(probs).astype(np.float16), labels=np.asarray(labels).astype(np.int64),
                    classes=np.array(classes), ckpt_path=np.array(str(ckpt_path)), weights=np.array(weights))


def file_key(path: str | Path) -> str:
    """Identifies a file by path, size and mtime (cheap; changes when the file is rewritten): cache names use it."""
    st = Path(path).stat()
    return hashlib.sha1(f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
