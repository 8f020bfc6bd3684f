"""Learning-rate range test: Lightning's Tuner sweeps the LR exponentially; we pick the suggestion.

The sweep is Lightning's (device, precision, data hooks all come from the Trainer). The suggestion is ours,
because Lightning 2.6's own (``tuner/lr_finder.py``) misleads on an exponential sweep:
  * its running average is debiased one step late (``global_step`` is already 1 after the first batch), so the
    curve seems to rise at tiny LRs (https://github.com/Lightning-AI/pytorch-lightning/issues/14167);
  * ``suggestion()`` differentiates against the LR, not log(LR), so noise among the densely spaced tiny LRs wins
    (https://github.com/Lightning-AI/pytorch-lightning/issues/21141; what it picked for the seed recipe:
    docs/recipes.md, the seed recipe).
We undo the bias exactly and take the steepest descent against log(LR), as torch-lr-finder (the seed) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import numpy as np
from lightning.pytorch.tuner import Tuner

from cifarlab.errors import CifarlabError

BETA = 0.98  # Lightning's loss smoothing factor in the range test (_LRCallback's default)


def debias(smoothed: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Lightning's smoothed losses with the correct bias correction ``1 - beta**(k + 1)`` for point ``k``."""
    k = np.arange(len(smoothed))
    running_average = np.asarray(smoothed, dtype=np.float64) * (1 - beta ** (k + 2))
    return running_average / (1 - beta ** (k + 1))


def steepest_descent(lrs, losses, skip_begin: int = 10, skip_end: int = 5, window: int = 5) -> int:
    """Index of the steepest loss decrease against log(lr), before the loss minimum.

    The slope at point i spans points i - window .. i + window (0.4 decade on the default 200-step sweep over
    8 decades), so batch-to-batch noise among the first points cannot win against the real descent.
    """
    lrs, losses = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(losses)
    if finite.sum() < 2 * window + 3:
        raise ValueError("too few points")
    lowest = int(np.argmin(np.where(finite, losses, np.inf)))  # past it the loss only diverges
    idx = np.arange(max(skip_begin, window), min(lowest, len(losses) - skip_end) - window + 1)
    if len(idx) == 0:
        raise ValueError("too few points before the loss minimum")
    log_lr = np.log(lrs)
    slope = (losses[idx + window] - losses[idx - window]) / (log_lr[idx + window] - log_lr[idx - window])
    slope = np.where(np.isfinite(slope), slope, np.inf)
    return int(idx[np.argmin(slope)])


@dataclass
class LRSweep:
    """An LR range test: ``lrs`` and ``losses`` (debiased, smoothed) per point, ``best`` the suggested point."""

    lrs: np.ndarray
    losses: np.ndarray
    best: int
    min_lr: float
    max_lr: float

    @property
    def suggestion(self) -> float:
        return float(self.lrs[self.best])


def lr_range_test(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule,
                  min_lr: float = 1e-7, max_lr: float = 10.0, num_iter: int = 200) -> LRSweep:
    """Sweep the LR exponentially from ``min_lr`` to ``max_lr`` over ``num_iter`` training batches and pick the
    steepest descent. The model's weights are restored afterwards."""
    finder = Tuner(trainer).lr_find(model, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                    num_training=num_iter, mode="exponential", update_attr=False)
    lrs = np.asarray(finder.results["lr"], dtype=np.float64)
    losses = debias(np.asarray(finder.results["loss"], dtype=np.float64))
    try:
        best = steepest_descent(lrs, losses)
    except ValueError:
        raise CifarlabError(f"the LR range test stopped after {len(lrs)} points, too few for a suggestion "
                            "(the loss diverged early): raise --num_iter or lower --max_lr") from None
    sweep = LRSweep(lrs, losses, best, min_lr, max_lr)
    if not math.isfinite(sweep.suggestion):
        raise CifarlabError("the LR range test gave no finite suggestion: check the data and --min_lr/--max_lr")
    return sweep
