"""Shared by the latency benchmarks: wall-clock milliseconds of repeated calls after a warm-up."""

from __future__ import annotations

import time


def time_ms(fn, repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times
