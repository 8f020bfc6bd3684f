"""Helpers shared by the tests that run `cifarlab fit` and read its run folder."""

from __future__ import annotations

import csv
from pathlib import Path


def lr_by_step(run: Path) -> dict[int, tuple]:
    """``{global step: (lr of each param group)}`` from the run's metrics.csv (the last row of a step wins)."""
    out = {}
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            lrs = tuple(float(row[k]) for k in sorted(row) if k.startswith("lr-") and row[k])
            if lrs:
                out[int(row["step"])] = lrs
    return out
