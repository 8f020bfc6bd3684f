"""The LightningDataModule: CIFAR-10 from torchvision or any ImageFolder tree (``cifarlab.datasets``), split, served.

Sources (``--data.source``):
  * ``cifar10``: torchvision's CIFAR10, downloaded in ``prepare_data`` (the default when no root is given).
  * ``folder``: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (the default when a root is given).

A stratified, seeded validation split is held out of the training images; the test split is only
used by ``test`` (and at the end of ``fit``). For cross-validation (``cifarlab audit``, ``--data.folds K
--data.fold k``), the training images are first dealt into K stratified folds and fold k is held out of both.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from cifarlab.datasets import (
    DataSource,
    ImageArrayDataset,
    Split,
    cache_folder_split,
    download_cifar10,
    folder_classes,
    list_folder_split,
    load_cifar10_split,
    load_folder_split,
    stratified_folds,
    stratified_split,
)
from cifarlab.errors import ConfigError
from cifarlab.pruning import LossPruning, LossPruningConfig, PrunedSampler
from cifarlab.settings import as_group
from cifarlab.stats import cached_channel_stats
from cifarlab.transforms import (
    IMAGE_SIZE,
    MIN_CROP,
    AugmentConfig,
    BatchAugment,
    albumentations_pipeline,
    crop_for_epoch,
)

MIN_BATCHES = 3  # the fewest batches an epoch holds: drop_last then leaves out under a third of its images


def _batch_is_collated(batch):
    return batch


# ---------------------------------------------------------------------------------------------- datamodule
def batch_for(images: int, batch_size: int) -> int:
    """The training batch for ``images`` training images (per rank): ``batch_size`` where the images hold
    ``MIN_BATCHES`` of it, else the largest power of two that they hold ``MIN_BATCHES`` times (0: too few images)."""
    if images >= MIN_BATCHES * batch_size:
        return batch_size
    most = images // MIN_BATCHES
    return 1 << (most.bit_length() - 1) if most else 0


class ExactSplitSampler(DistributedSampler):
    """Rank r evaluates images r, r + world, r + 2 world, ...: no padding, so every image counts exactly once."""

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples, self.total_size = len(range(rank, len(dataset), num_replicas)), len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10 (torchvision) or an ImageFolder tree, as uint8 batches ``(B, 3, 32, 32)`` and int64 labels.

    Args:
        root: ImageFolder root with ``train/`` and ``test/``; or, with ``source=cifar10``, where torchvision
            keeps CIFAR-10 (default ``~/.cache/cifarlab/cifar10``).
        source: ``auto`` = ``folder`` when a root is given, else ``cifar10``.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and prediction (no gradients: larger is faster).
        val_size: training images held out, stratified, for validation. 0: none, every image trains (for
            recipes that test their final weights, ``checkpoint.monitor: null``; no validation runs).
        split_seed: seed of the validation split (fixed apart from the training seed, so runs compare).
        augment: training augmentation (see ``AugmentConfig``).
        num_workers: DataLoader worker processes; only the albumentations back end needs any.
        cache_dir: where decoded arrays and statistics are cached (default ``<root>/.cifarlab-cache``, or
            ``~/.cache/cifarlab/...`` when the root is read-only).
        skip_corrupt: leave out image files that do not decode (with a warning that counts them) instead of
            stopping with an error that names the first one.
        folds: for cross-validation (``cifarlab audit``): the training images are dealt into this many stratified
            folds (seeded by ``split_seed``) and fold ``fold`` is held out of training and validation. 1: no folds.
        fold: the fold held out, 0 to ``folds`` - 1.
        pruning: see ``LossPruningConfig`` (``cifarlab.pruning``): epochs that leave out part of the images the
            network already fits; off by default. Training batches then carry their images' indices.
    """

    def __init__(
        self,
        root: str | None = None,
        source: Literal["auto", "cifar10", "folder"] = "auto",
        batch_size: int = 512,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: AugmentConfig | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        skip_corrupt: bool = False,
        folds: int = 1,
        fold: int = 0,
        pruning: LossPruningConfig | None = None,
    ):
        super().__init__()
        if folds < 1 or not 0 <= fold < folds:
            raise ConfigError(f"--data.folds {folds} --data.fold {fold}: pass --data.folds K (1 or more; 1: no "
                              "cross-validation) and --data.fold between 0 and K - 1")
        augment = AugmentConfig(**augment) if isinstance(augment, dict) else (augment or AugmentConfig())
        if augment.flip and augment.alternate_flips and augment.backend != "tensor":
            raise ConfigError("augment.alternate_flips needs --data.augment.backend tensor")
        if (augment.brightness or augment.contrast) and augment.backend != "tensor":
            raise ConfigError("augment.brightness and augment.contrast need --data.augment.backend tensor")
        if augment.brightness < 0 or not 0 <= augment.contrast < 1:
            raise ConfigError(f"augment.brightness (std units) must be >= 0 and augment.contrast in [0, 1), got "
                              f"{augment.brightness} and {augment.contrast}")
        pruning = as_group(LossPruningConfig, pruning)
        if pruning.prune > 0 and augment.backend != "tensor":
            raise ConfigError("--data.pruning needs --data.augment.backend tensor")
        if augment.early_crop and augment.early_crop_epochs:
            if augment.backend != "tensor":
                raise ConfigError("augment.early_crop needs --data.augment.backend tensor")
            if not MIN_CROP <= augment.early_crop <= IMAGE_SIZE:
                raise ConfigError(f"augment.early_crop is the side of a training crop: between {MIN_CROP} and "
                                  f"{IMAGE_SIZE} pixels (or 0 for none), got {augment.early_crop}")
        # Plain types only in checkpoints, so they load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["augment", "pruning"])
        self.hparams["augment"] = asdict(augment)
        self.hparams["pruning"] = asdict(pruning)
        self.pruning_config = pruning
        self.pruning: LossPruning | None = None  # the training images' scores, once set up with pruning on
        self.data = DataSource(root, source, cache_dir, skip_corrupt)
        self.root, self.source = root, self.data.source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.num_workers = num_workers
        self.skip_corrupt = skip_corrupt
        self.folds = folds
        self.fold = fold
        # Filled by setup(): nothing is loaded before it (prepare_data may run on another process).
        self.classes: list[str] | None = None
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.batch_augment: BatchAugment | None = None  # the tensor back end's augmentation, once set up

    # -- where things live (``DataSource``)
    @property
    def data_root(self) -> Path:
        return self.data.data_root

    @property
    def cache_dir(self) -> Path:
        return self.data.cache_dir

    @property
    def class_names(self) -> list[str]:
        """Known without loading any image (the CLI hands them to the model, so checkpoints carry them)."""
        return self.data.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fewest_training_images(self) -> int:
        """How many training images there are at the least, from the file list alone (CIFAR-10: 50,000) and before
        any image is decoded: all but the validation split and the largest fold held out (unreadable files aside)."""
        cifar10 = self.source == "cifar10"
        count = 50_000 if cifar10 else len(list_folder_split(self.data_root, "train", self.class_names))
        heldout = count // self.folds + self.num_classes if self.folds > 1 else 0  # a class's fold: its share + 1
        return count - self.val_size - heldout

    # -- Lightning hooks
    def prepare_data(self) -> None:
        """Download CIFAR-10 or build the decode cache, and the statistics, once per machine (under DDP on local
        rank 0 only, while the other ranks wait: they only read in ``setup``)."""
        if self.source == "cifar10":
            download_cifar10(self.data_root)
            train = load_cifar10_split(self.data_root, "train")
        else:
            classes = folder_classes(self.data_root)
            cache_folder_split(self.data_root, "test", classes, self.cache_dir, skip_corrupt=self.skip_corrupt)
            key = cache_folder_split(self.data_root, "train", classes, self.cache_dir, skip_corrupt=self.skip_corrupt)
            if (self.cache_dir / f"stats-{key}.json").exists():
                return
            train = load_folder_split(self.data_root, "train", classes, self.cache_dir, skip_corrupt=self.skip_corrupt)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cached_channel_stats(train.images, self.cache_dir / f"stats-{train.key}.json")

    def load_splits(self) -> dict[str, Split]:
        """The train and test splits as uint8 arrays (a folder is decoded here if prepare_data did not run)."""
        return self.data.load_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.load_splits()
        train, test = splits["train"], splits["test"]
        self.classes = train.classes
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Statistics of the whole training folder (held-out part included), as published for CIFAR-10.
        self.mean, self.std = cached_channel_stats(train.images, self.cache_dir / f"stats-{train.key}.json")
        pool = np.setdiff1d(np.arange(len(train.labels)), self.heldout_indices(train.labels))
        train_idx, val_idx = stratified_split(train.labels[pool], self.val_size, self.split_seed)
        train_idx, val_idx = pool[train_idx], pool[val_idx]  # positions in the whole training split
        per_sample = None
        if self.augment.backend == "albumentations":
            per_sample = albumentations_pipeline(self.augment, self.mean)
        elif self.augment.backend == "tensor":
            self.batch_augment = BatchAugment(self.augment, self.mean, self.std)
        self.train_set = ImageArrayDataset(train.images[train_idx], train.labels[train_idx], per_sample)
        if self.augment.flip and self.augment.alternate_flips:
            # Seeded from torch's seed (seed_everything), so a resumed run flips the same images.
            gen = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
            flip_first = torch.rand(len(self.train_set), generator=gen) < 0.5
            self.train_set.alternate_flips(flip_first, lambda: self.trainer.current_epoch if self.trainer else 0)
        if self.pruning_config.prune > 0:
            self.pruning = LossPruning(len(self.train_set), self.pruning_config)
            self.train_set.serve_indices = True
        self.val_set = ImageArrayDataset(train.images[val_idx], train.labels[val_idx]) if len(val_idx) else None
        self.test_set = ImageArrayDataset(test.images, test.labels)

    def heldout_indices(self, labels: np.ndarray | None = None) -> np.ndarray:
        """Positions in the whole training split (the order of ``load_splits()["train"]``, whose ``labels`` may be
        passed to save loading it) of the fold held out: sorted, empty with ``folds`` = 1."""
        if self.folds == 1:
            return np.zeros(0, dtype=np.int64)
        if labels is None:
            labels = self.load_splits()["train"].labels
        return np.flatnonzero(stratified_folds(np.asarray(labels), self.folds, self.split_seed) == self.fold)

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool = False,
                sampler: Sampler | None = None) -> DataLoader:
        workers = self.num_workers if dataset.transform is not None else 0
        trainer = self.trainer
        if sampler is None and not shuffle and trainer is not None and trainer.world_size > 1:
            # Lightning's DistributedSampler pads evaluation sets by repeating images until every rank has as
            # many; this one splits them exactly, so validation and test accuracy count each image once.
            sampler = ExactSplitSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, sampler=sampler,
                          num_workers=workers, persistent_workers=workers > 0,
                          collate_fn=_batch_is_collated, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < self.batch_size:  # (`cifarlab fit` sizes the batch to the data before this)
            smaller = max(batch_for(len(self.train_set), self.batch_size), 1)
            raise ConfigError(f"--data.batch_size {self.batch_size} is larger than the {len(self.train_set)} "
                              f"training images: an epoch would hold no batch; pass --data.batch_size {smaller} "
                              "or less (and scale the learning rates with it)")
        if self.pruning is None:
            return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=True)
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError("--data.pruning runs in one process only: leave it out under DDP")
        return self._loader(self.train_set, self.batch_size, shuffle=False, drop_last=True,
                            sampler=PrunedSampler(self.pruning, self.pruning_on))

    def pruning_on(self) -> bool:
        """Whether the epoch starting now is pruned: before ``pruning.until`` of the run's optimizer steps."""
        trainer = self.trainer
        if trainer is None:
            return True
        total = getattr(trainer.lightning_module, "total_steps", None) or trainer.max_steps
        return total is None or total < 0 or trainer.global_step < self.pruning_config.until * total

    def state_dict(self) -> dict:
        """Saved in checkpoints: the pruning scores, so a resumed run prunes as the first would have."""
        return {"pruning": self.pruning.state_dict()} if self.pruning is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.pruning is not None and "pruning" in state_dict:
            self.pruning.load_state_dict(state_dict["pruning"])

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []  # val_size 0: Lightning skips validation
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Batched augmentation runs here: on the training device, on whole uint8 batches."""
        training = self.trainer is not None and self.trainer.training
        # (ModelSummary also sends its bare example tensor through here: leave that alone.)
        if self.batch_augment is not None and training and isinstance(batch, (list, tuple)):
            x, *rest = batch  # (x, y) or, with pruning, (x, y, index)
            self.batch_augment.to(x.device)
            batch = (self.batch_augment(x, crop_for_epoch(self.augment, self.trainer.current_epoch)), *rest)
        return batch

    def train_transform(self):
        """A callable ``(B, 3, H, W) uint8 -> augmented`` for previews, whatever the back end."""
        if self.augment.backend == "tensor":
            return self.batch_augment
        if self.augment.backend == "albumentations":
            pipe = self.train_set.transform
            return lambda x: torch.stack([pipe(image=im.permute(1, 2, 0).numpy())["image"] for im in x])
        return lambda x: x
