"""Data: CIFAR-10 from torchvision or any ImageFolder tree, decoded once into a uint8 cache, split, served.

Sources (``--data.source``):
  * ``cifar10``: torchvision's CIFAR10, downloaded in ``prepare_data`` (the default when no root is given).
  * ``folder``: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (the default when a root is given).

A folder is decoded once into ``<cache_dir>/<split>-<key>.npz``; the key hashes every file's path, size
and mtime, so adding, removing or touching a file rebuilds the cache instead of reusing a stale one.
A stratified, seeded validation split is held out of the training images; the test split is only
used by ``test`` (and at the end of ``fit``). For cross-validation (``cifarlab audit``, ``--data.folds K
--data.fold k``), the training images are first dealt into K stratified folds and fold k is held out of both.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import CIFAR10

from cifarlab.errors import ConfigError, DataError
from cifarlab.files import save_npz
from cifarlab.progress import progress
from cifarlab.stats import cached_channel_stats
from cifarlab.transforms import (
    IMAGE_SIZE,
    MIN_CROP,
    AugmentConfig,
    BatchAugment,
    albumentations_pipeline,
    alternate_flip_mask,
    crop_for_epoch,
    pil_to_uint8,
)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_CIFAR10_ROOT = "~/.cache/cifarlab/cifar10"
MIN_BATCHES = 3  # the fewest batches an epoch holds: drop_last then leaves out under a third of its images


@dataclass
class Split:
    """One split held in memory: ``images`` (N, 32, 32, 3) uint8, ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    key: str  # identifies the data it came from; names the stats cache


# ---------------------------------------------------------------------------------------------- folders
def folder_classes(root: str | os.PathLike) -> list[str]:
    """Class names of an ImageFolder tree (sorted folder names), after checking its layout."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist: pass --data.root DIR holding train/<class>/ "
                        "and test/<class>/ folders (or leave it out to use torchvision's CIFAR-10)")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: pass a folder holding train/ and test/")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir())[:8]
        raise DataError(f"{root} is not a train/test ImageFolder tree: no {' or '.join(s + '/' for s in missing)} "
                        f"folder (found: {', '.join(found) or 'nothing'}); expected train/<class>/ and test/<class>/")
    per_split = {}
    for split in ("train", "test"):
        names = sorted(p.name for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DataError(f"{root / split} has no class folders: expected {split}/<class>/<image files>")
        per_split[split] = names
    if per_split["train"] != per_split["test"]:
        only_train = sorted(set(per_split["train"]) - set(per_split["test"]))
        only_test = sorted(set(per_split["test"]) - set(per_split["train"]))
        raise DataError(f"class folders differ between {root}/train and {root}/test: only in train: "
                        f"{only_train or 'none'}; only in test: {only_test or 'none'}; make both hold the same classes")
    return per_split["train"]


def list_folder_split(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """``(path, label)`` for every image file of ``root/split``, in a stable (sorted) order."""
    files = []
    for label, name in enumerate(classes):
        folder = root / split / name
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise DataError(f"class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}): "
                            "add images or remove the folder from both train/ and test/")
        files += [(p, label) for p in found]
    return files


def folder_key(files: list[tuple[Path, int]], root: Path) -> str:
    """Hash of every file's relative path, size and mtime: changes whenever the folder's content does."""
    h = hashlib.sha1(f"v1:{IMAGE_SIZE}".encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def decode_image(path: Path) -> np.ndarray:
    """Decode one file to ``(32, 32, 3)`` uint8; a file PIL cannot read fully is a ``DataError`` naming it."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here rather than later
            return pil_to_uint8(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}; remove or replace the file, "
                        "or pass --data.skip_corrupt true to leave such files out") from None


def _report_skipped(skipped: list[str], folder: Path, skip_corrupt: bool) -> None:
    if not skipped:
        return
    if not skip_corrupt:  # the cache was built with skip_corrupt; this run asked for every file to be read
        decode_image(folder / skipped[0])  # raises the usual one-line error, naming the file
    rank_zero_warn(f"skipped {len(skipped)} unreadable image file(s) in {folder} (first: {skipped[0]}); "
                   "they are left out of the data")


def _folder_cache(root: Path, split: str, classes: list[str], cache_dir: Path) -> tuple[list, str, Path]:
    """The files of ``root/split``, their key and the cache file named by it."""
    files = list_folder_split(root, split, classes)
    key = folder_key(files, root)
    return files, key, cache_dir / f"{split}-{key}.npz"


def cache_folder_split(root: Path, split: str, classes: list[str], cache_dir: Path,
                       skip_corrupt: bool = False) -> str:
    """Make sure ``root/split`` is in the uint8 decode cache in ``cache_dir`` (decoding it if not); its key."""
    files, key, cache_file = _folder_cache(root, split, classes, cache_dir)
    if not cache_file.exists():
        _decode_folder_split(files, root, split, classes, key, cache_file, skip_corrupt)
    return key


def load_folder_split(root: Path, split: str, classes: list[str], cache_dir: Path,
                      skip_corrupt: bool = False) -> Split:
    """``root/split`` as a ``Split``, from the uint8 decode cache in ``cache_dir`` (decoded into it first if needed).
    With ``skip_corrupt``, files that do not decode are left out with a warning that counts them (and the cache
    remembers them)."""
    files, key, cache_file = _folder_cache(root, split, classes, cache_dir)
    if not cache_file.exists():
        return _decode_folder_split(files, root, split, classes, key, cache_file, skip_corrupt)
    with np.load(cache_file, allow_pickle=False) as z:
        skipped = [str(f) for f in z["skipped"]] if "skipped" in z else []
        _report_skipped(skipped, root, skip_corrupt)
        return Split(z["images"], z["labels"], [str(c) for c in z["classes"]], key)


def _decode_folder_split(files: list, root: Path, split: str, classes: list[str], key: str, cache_file: Path,
                         skip_corrupt: bool) -> Split:
    images, labels, skipped = [], [], []
    for path, label in progress(files, f"decoding {root / split} (once, then cached)"):
        try:
            images.append(decode_image(path))
        except DataError:
            if not skip_corrupt:
                raise
            skipped.append(str(path.relative_to(root)))
            continue
        labels.append(label)
    if not images:
        raise DataError(f"no readable image in {root / split}: check the files")
    images, labels = np.stack(images), np.array(labels, dtype=np.int64)
    _report_skipped(skipped, root, skip_corrupt)
    # atomic: an interrupted run never leaves a half-written cache
    save_npz(cache_file, images=images, labels=labels, classes=np.array(classes), skipped=np.array(skipped, dtype=str))
    for stale in cache_file.parent.glob(f"{split}-*.npz"):
        if stale != cache_file:
            stale.unlink(missing_ok=True)
    return Split(images, labels, classes, key)


# ---------------------------------------------------------------------------------------------- cifar10
def download_cifar10(root: Path) -> None:
    """Fetch torchvision's CIFAR-10 into ``root`` (no-op when already there)."""
    try:
        for train in (True, False):
            CIFAR10(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise DataError(f"could not download CIFAR-10 into {root} ({err}); without internet, pass "
                        "--data.root DIR holding train/<class>/ and test/<class>/ image folders") from None


def load_cifar10_split(root: Path, split: str) -> Split:
    """Read torchvision's CIFAR-10 split from ``root`` (already uint8 in memory: no decode cache needed)."""
    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=False)
    except RuntimeError as err:
        raise DataError(f"CIFAR-10 not found in {root} ({err}); run `cifarlab stats` online once, "
                        "or pass --data.root DIR with train/ and test/ image folders") from None
    return Split(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64),
                 list(ds.classes), key=f"cifar10-{split}")


# ---------------------------------------------------------------------------------------------- splits
def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold ``(N,)`` of every image: each class's images shuffled (seeded) and dealt round-robin, so every fold
    holds each class in proportion and fold sizes differ by at most one image per class."""
    fold = np.zeros(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + int(c)) % folds  # + c: the first fold is not always the largest
    return fold


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` with ``val_size`` validation images spread over classes in proportion
    (``val_size=0``: every image trains, ``val`` is empty)."""
    if not 0 <= val_size < len(labels):
        raise DataError(f"--data.val_size {val_size} must be between 0 (no validation) and the {len(labels)} "
                        "training images - 1")
    rng = np.random.default_rng(seed)
    if val_size == 0:
        return rng.permutation(len(labels)), np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = val_size * counts / len(labels)
    take = np.floor(quota).astype(int)
    # Hand the remaining images to the classes with the largest rounding loss.
    take[np.argsort(take - quota)[: val_size - take.sum()]] += 1
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take)])
    train = np.setdiff1d(np.arange(len(labels)), val)
    return rng.permutation(train), np.sort(val)


class ImageArrayDataset(Dataset):
    """Serves ``(image (3, 32, 32) uint8, label)`` from in-memory ``(N, 32, 32, 3)`` uint8 arrays.

    Without a per-sample transform, ``__getitems__`` hands the DataLoader a whole batch by one fancy-index
    (microseconds) instead of collating 512 single images. Batches are NHWC memory seen as ``(B, 3, H, W)``:
    exactly the channels-last layout the model runs in, so no copy is made to get there.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images = images  # (N, H, W, 3) uint8, shared with the tensor view below
        self._pixels = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.transform = transform
        self._seeded_pid = None
        self._flip_first: torch.Tensor | None = None  # (N,) bool, set by alternate_flips()
        self._epoch_fn = None

    def alternate_flips(self, flip_first: torch.Tensor, epoch_fn) -> None:
        """Serve image ``i`` mirrored in epoch ``e`` when ``flip_first[i] != (e is odd)``; ``epoch_fn()`` gives
        the epoch being served (read per batch: the DataLoader runs in this process, as batched augmentation
        needs no workers)."""
        self._flip_first, self._epoch_fn = flip_first, epoch_fn

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (never augmented) images ``(B, 3, H, W)`` uint8 and labels ``(B,)`` at ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self._pixels[idx].permute(0, 3, 1, 2), self.labels[idx]

    def __getitem__(self, i: int):
        if self.transform is None:
            return self._pixels[i].permute(2, 0, 1), self.labels[i]
        if self._seeded_pid != os.getpid():
            # albumentations keeps its own RNG: derive it from torch's, which seed_everything and the
            # DataLoader set per worker, so runs are reproducible and workers do not repeat each other.
            self.transform.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_pid = os.getpid()
        return self.transform(image=self.images[i])["image"], self.labels[i]

    def __getitems__(self, indices: list[int]):
        if self.transform is None:
            x, y = self.batch(indices)
            if self._flip_first is not None:
                flip = alternate_flip_mask(self._flip_first[torch.as_tensor(indices)], self._epoch_fn())
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            return x, y
        return torch.utils.data.default_collate([self[i] for i in indices])


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
        if augment.early_crop and augment.early_crop_epochs:
            if augment.backend != "tensor":
                raise ConfigError("augment.early_crop needs --data.augment.backend tensor")
            if not MIN_CROP <= augment.early_crop <= IMAGE_SIZE:
                raise ConfigError(f"augment.early_crop is the side of a training crop: between {MIN_CROP} and "
                                  f"{IMAGE_SIZE} pixels (or 0 for none), got {augment.early_crop}")
        # Plain types only in checkpoints, so they load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["augment"])
        self.hparams["augment"] = asdict(augment)
        self.root = root
        self.source = ("folder" if root else "cifar10") if source == "auto" else source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.num_workers = num_workers
        self._cache_dir = cache_dir
        self.skip_corrupt = skip_corrupt
        self.folds = folds
        self.fold = fold
        # Filled by setup(): nothing is loaded before it (prepare_data may run on another process).
        self.classes: list[str] | None = None
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.batch_augment: BatchAugment | None = None  # the tensor back end's augmentation, once set up

    # -- where things live
    @property
    def data_root(self) -> Path:
        if self.source == "cifar10":
            return Path(self.root or DEFAULT_CIFAR10_ROOT).expanduser()
        if not self.root:
            raise DataError("--data.source folder needs --data.root DIR holding train/<class>/ and test/<class>/")
        return Path(self.root).expanduser()

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir:
            return Path(self._cache_dir).expanduser()
        beside = self.data_root / ".cifarlab-cache"
        if os.access(self.data_root, os.W_OK) or os.access(beside, os.W_OK):
            return beside
        digest = hashlib.sha1(str(self.data_root.resolve()).encode()).hexdigest()[:12]
        return Path("~/.cache/cifarlab").expanduser() / f"{self.data_root.name}-{digest}"

    @property
    def class_names(self) -> list[str]:
        """Known without loading any image (the CLI hands them to the model, so checkpoints carry them)."""
        return list(CIFAR10_CLASSES) if self.source == "cifar10" else folder_classes(self.data_root)

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
        if self.source == "cifar10":
            return {s: load_cifar10_split(self.data_root, s) for s in ("train", "test")}
        root = self.data_root
        classes = folder_classes(root)
        return {s: load_folder_split(root, s, classes, self.cache_dir, skip_corrupt=self.skip_corrupt)
                for s in ("train", "test")}

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

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self.num_workers if dataset.transform is not None else 0
        sampler = None
        trainer = self.trainer
        if not shuffle and trainer is not None and trainer.world_size > 1:
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
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=True)

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
            x, y = batch
            self.batch_augment.to(x.device)
            batch = (self.batch_augment(x, crop_for_epoch(self.augment, self.trainer.current_epoch)), y)
        return batch

    def train_transform(self):
        """A callable ``(B, 3, H, W) uint8 -> augmented`` for previews, whatever the back end."""
        if self.augment.backend == "tensor":
            return self.batch_augment
        if self.augment.backend == "albumentations":
            pipe = self.train_set.transform
            return lambda x: torch.stack([pipe(image=im.permute(1, 2, 0).numpy())["image"] for im in x])
        return lambda x: x
