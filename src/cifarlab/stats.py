"""Per-channel mean and std of the training split (0..1 scale), cached as JSON next to the data cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cifarlab.files import write_json


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Mean and (population) std per channel of ``(N, H, W, 3)`` uint8 images, on the 0..1 scale.

    Sums run in float64 over chunks, so memory stays small and the result does not depend on N's size.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"expected a non-empty (N, H, W, 3) image array, got shape {images.shape}")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, 3).astype(np.float64)
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
    n = len(images) * images.shape[1] * images.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - np.square(mean), 0.0))
    return (mean / 255).tolist(), (std / 255).tolist()


def cached_channel_stats(images: np.ndarray, cache_file: Path) -> tuple[list[float], list[float]]:
    """``channel_stats`` read from ``cache_file`` when present, else computed and written there.

    The cache file's name carries the data cache key, so changed data never reuses stale statistics.
    """
    cache_file = Path(cache_file)
    if cache_file.exists():
        try:
            saved = json.loads(cache_file.read_text())
            return saved["mean"], saved["std"]
        except (ValueError, KeyError):
            pass  # unreadable cache: recompute and overwrite it below
    mean, std = channel_stats(images)
    write_json({"mean": mean, "std": std, "num_images": len(images)}, cache_file)  # ranks may race: atomic
    return mean, std
