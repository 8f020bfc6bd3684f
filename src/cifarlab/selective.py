"""Selective backprop: train each step on the part of the batch the network still gets most wrong.

Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers" (arXiv:1910.00762), as MosaicML
Composer ships it (``SelectiveBackprop``): inside a window of the run, every image of the batch goes through a forward
pass without gradients, and only the ``keep`` share with the highest loss goes through the training forward and
backward. On the fast recipe the backward and the optimizer are three quarters of a step, and a selective step keeping
half costs 0.74-0.78 of a plain one (docs/results.md). Two choices differ from Composer's:

- The images kept are exactly the ``keep`` share with the highest loss (Composer draws them at random, weighted by
  their rank), so a step depends only on the weights and the batch.
- The scoring pass runs in eval mode: BatchNorm normalises with its running statistics and leaves them alone, so
  they are updated once per step, by the training forward, as without selection; each image's loss then does not
  depend on its batch mates, and a ``SyncBatchNorm`` makes no collective call (under DDP each process selects from
  its own batch, with no communication). With ``hiverge``'s BN momentum (0.56 of the statistics kept per step) the
  running statistics are those of the last two or three steps, close to the batch's own.

Plain PyTorch (no Lightning): ``ImageClassifier.training_step`` calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import ConfigError


@dataclass(frozen=True)
class SelectiveBackpropConfig:
    """Selective backprop (Jiang et al. 2019; Composer's ``SelectiveBackprop``): inside a window of the run, each step
    scores the whole batch with a forward pass without gradients and trains on its highest-loss images only. The LR
    schedule and the step count stay: a step on fewer images is still a step."""

    keep: float = 1.0
    """Share of each batch trained on in the window: the images with the highest loss (Composer suggests 0.5). 1.0: off,
    every image of every step, as without this option."""
    start: float = 0.5
    """Share of the run's optimizer steps before selection begins: the network must know the easy images first
    (Composer: 0.5)."""
    end: float = 0.9
    """Share of the run's optimizer steps after which whole batches return, so the last steps (and the BatchNorm
    statistics they leave) see every kind of image (Composer: 0.9)."""
    interrupt: int = 2
    """Inside the window, every ``interrupt``-th step trains on the whole batch (Composer: 2, alternate steps); 0:
    every step selects."""
    scale_factor: float = 1.0
    """Side of the scoring pass's images relative to the training images, bilinear (Composer suggests 0.5: a quarter
    of the pixels, a quarter of the scoring cost); 1.0: full size. The network must take smaller images."""

    def check(self) -> None:
        """A ``ConfigError`` for a value out of range (the CLI's parser checks types only)."""
        if not 0 < self.keep <= 1:
            raise ConfigError(f"selective_backprop.keep is the share of a batch trained on, in (0, 1] (1: off), "
                              f"got {self.keep}")
        if not 0 <= self.start <= self.end <= 1:
            raise ConfigError(f"selective_backprop.start {self.start} and selective_backprop.end {self.end}: both are "
                              f"shares of the run's optimizer steps, with 0 <= start <= end <= 1")
        if self.interrupt < 0:
            raise ConfigError(f"selective_backprop.interrupt is a number of steps >= 0 (0: never a whole batch), "
                              f"got {self.interrupt}")
        if not 0 < self.scale_factor <= 1:
            raise ConfigError(f"selective_backprop.scale_factor is a size ratio in (0, 1], got {self.scale_factor}")

    def selects(self, step: int, total_steps: int) -> bool:
        """Whether optimizer step ``step`` (0-based) of ``total_steps`` trains on a selection."""
        if self.keep >= 1 or not self.start * total_steps <= step < self.end * total_steps:
            return False
        return self.interrupt == 0 or (step + 1) % self.interrupt != 0


def kept_count(n: int, keep: float) -> int:
    """Images kept of a batch of ``n``: ``keep x n`` rounded, at least one."""
    return min(n, max(1, round(keep * n)))


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (BatchNorm on its running statistics, which it leaves alone), each
    submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def losses_of(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
              label_smoothing: float = 0.0, scale_factor: float = 1.0) -> torch.Tensor:
    """Per-image cross-entropy ``(B,)`` of images ``x`` (uint8 or 0..255 float, ``(B, C, H, W)``) with labels ``y``,
    without gradients; with ``scale_factor`` < 1 the images are first shrunk (bilinear, as Composer)."""
    if scale_factor < 1:
        x = F.interpolate(x.float(), scale_factor=scale_factor, mode="bilinear", align_corners=False,
                          recompute_scale_factor=False)
    return F.cross_entropy(logits_fn(x).float(), y, reduction="none", label_smoothing=label_smoothing)


def select_by_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, keep: float,
                   *, label_smoothing: float = 0.0, scale_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` share (``kept_count``) of images ``x`` with labels ``y`` whose loss under ``logits_fn`` is highest,
    in their batch order: ``(x_kept, y_kept)``. Scored without gradients; put the model in the mode to score in
    (``evaluating``) around the call."""
    losses = losses_of(logits_fn, x, y, label_smoothing=label_smoothing, scale_factor=scale_factor)
    index = losses.topk(kept_count(len(y), keep), sorted=False).indices.sort().values
    return x[index], y[index]

