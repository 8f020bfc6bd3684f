"""Loss-based data pruning: leave out of each epoch part of the images the network already fits, at no scoring cost.

InfoBatch (Qin et al., ICLR 2024, "InfoBatch: Lossless Training Acceleration by Unbiased Dynamic Data Pruning",
https://github.com/NUS-HPC-AI-Lab/InfoBatch), the stale-loss form of selective backprop (Jiang et al. 2019): an
image's score is its loss the last time it trained, a by-product of the training step, so no pass runs to score it. At
each epoch's start, every image scored below the mean is left out at random with probability ``prune``; the ones kept
have their loss scaled by 1 / (1 - prune), so the epoch's gradient stays an estimate of the whole set's. Images never
trained on are always kept. After ``until`` of the run's optimizer steps every image trains again, unweighted.

An epoch then holds fewer batches: a run of the same step count covers more epochs. Plain PyTorch (no Lightning):
``CIFARDataModule`` serves the epochs, ``ImageClassifier.training_step`` weights and records the losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from cifarlab.errors import ConfigError


@dataclass(frozen=True)
class LossPruningConfig:
    """InfoBatch's dynamic pruning: each epoch leaves out part of the images whose last loss is below the mean."""

    prune: float = 0.0
    """Probability that an image scored below the mean is left out of an epoch (InfoBatch: 0.5). 0: off, every image
    of every epoch, as without this option."""
    until: float = 0.875
    """Share of the run's optimizer steps after which epochs hold every image again (InfoBatch's delta: 0.875)."""

    def check(self) -> None:
        """A ``ConfigError`` for a value out of range (the CLI's parser checks types only)."""
        if not 0 <= self.prune < 1:
            raise ConfigError(f"--data.pruning.prune is a probability in [0, 1) (0: off), got {self.prune}")
        if not 0 <= self.until <= 1:
            raise ConfigError(f"--data.pruning.until is a share of the run's steps in [0, 1], got {self.until}")


class LossPruning:
    """Scores (the last training loss) and loss weights of ``n`` training images, and each epoch's images."""

    def __init__(self, n: int, config: LossPruningConfig) -> None:
        self.config = config
        self.scores = torch.full((n,), float("inf"))  # (n,) last loss; inf: never trained on, always kept
        self.weights = torch.ones(n)  # (n,) loss weight of each image in the epoch being served
        self.left_out = 0  # images left out of the last epoch drawn

    def draw(self, generator: torch.Generator, prune: bool = True) -> torch.Tensor:
        """The indices of the next epoch's images, shuffled by ``generator``; with ``prune`` false, all of them."""
        n = len(self.scores)
        self.weights.fill_(1.0)
        keep = torch.ones(n, dtype=torch.bool)
        seen = torch.isfinite(self.scores)
        if prune and self.config.prune > 0 and seen.any():
            low = seen & (self.scores < self.scores[seen].mean())
            out = low & (torch.rand(n, generator=generator) < self.config.prune)
            keep &= ~out
            self.weights[low & keep] = 1 / (1 - self.config.prune)
        self.left_out = n - int(keep.sum())
        index = keep.nonzero().squeeze(1)
        return index[torch.randperm(len(index), generator=generator)]

    def record(self, index: torch.Tensor, losses: torch.Tensor) -> None:
        """Store the losses ``(B,)`` of images ``index`` ``(B,)`` as their scores."""
        self.scores[index.cpu()] = losses.detach().float().cpu()

    def weights_of(self, index: torch.Tensor) -> torch.Tensor:
        """Loss weights ``(B,)`` of images ``index`` in the epoch being served."""
        return self.weights[index.cpu()]

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone(), "weights": self.weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["scores"]) != len(self.scores):
            raise ConfigError(f"the checkpoint's pruning scores are for {len(state['scores'])} training images, this "
                              f"data has {len(self.scores)}: resume on the data the run was trained on")
        self.scores, self.weights = state["scores"].clone(), state["weights"].clone()


class PrunedSampler(Sampler[int]):
    """Each epoch's image indices from ``pruning.draw``, pruned while ``pruning_on()`` says so. Shuffled from a seed
    drawn from torch's global generator, as ``RandomSampler`` does, so ``seed_everything`` makes a run repeat."""

    def __init__(self, pruning: LossPruning, pruning_on: Callable[[], bool]) -> None:
        self.pruning, self.pruning_on = pruning, pruning_on
        self.size = len(pruning.scores)  # the last epoch's length (all images before the first)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        index = self.pruning.draw(generator, self.pruning_on())
        self.size = len(index)
        return iter(index.tolist())
