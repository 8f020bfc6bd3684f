"""Images on disk as uint8 arrays in memory, without Lightning: CIFAR-10 from torchvision or any ImageFolder tree,
decoded once into a cache, split and served as batches. ``CIFARDataModule`` trains on them; the app, ``report`` and
the audit read the test and training splits through ``DataSource`` alone.

A folder is decoded once into ``<cache_dir>/<split>-<key>.npz``; the key hashes every file's path, size
and mtime, so adding, removing or touching a file rebuilds the cache instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cifarlab.errors import DataError
from cifarlab.files import save_npz
from cifarlab.progress import progress
from cifarlab.transforms import IMAGE_SIZE, alternate_flip_mask, pil_to_uint8

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_CIFAR10_ROOT = "~/.cache/cifarlab/cifar10"


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
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # one warning per machine under DDP
    warnings.warn(f"skipped {len(skipped)} unreadable image file(s) in {folder} (first: {skipped[0]}); "
                   "they are left out of the data", stacklevel=2)


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
    from torchvision.datasets import CIFAR10  # torchvision: ~2 s of import, needed only by this source

    try:
        for train in (True, False):
            CIFAR10(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise DataError(f"could not download CIFAR-10 into {root} ({err}); without internet, pass "
                        "--data.root DIR holding train/<class>/ and test/<class>/ image folders") from None


def load_cifar10_split(root: Path, split: str) -> Split:
    """Read torchvision's CIFAR-10 split from ``root`` (already uint8 in memory: no decode cache needed)."""
    from torchvision.datasets import CIFAR10  # torchvision: ~2 s of import, needed only by this source

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
        self.serve_indices = False  # batches (images, labels, indices): set for loss-based pruning

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
            return (x, y, torch.as_tensor(indices, dtype=torch.long)) if self.serve_indices else (x, y)
        return torch.utils.data.default_collate([self[i] for i in indices])


# ---------------------------------------------------------------------------------------------- a data source
class DataSource:
    """Where a data set lives and its splits as arrays: ``root`` and ``source`` as ``CIFARDataModule`` takes them.

    Args:
        root: ImageFolder root with ``train/`` and ``test/``; or, with ``source=cifar10``, where torchvision keeps
            CIFAR-10 (default ``~/.cache/cifarlab/cifar10``).
        source: ``auto`` = ``folder`` when a root is given, else ``cifar10``.
        cache_dir: where decoded arrays and statistics are cached (default ``<root>/.cifarlab-cache``, or
            ``~/.cache/cifarlab/...`` when the root is read-only).
        skip_corrupt: leave out image files that do not decode (with a warning that counts them).
    """

    def __init__(self, root: str | None = None, source: Literal["auto", "cifar10", "folder"] = "auto",
                 cache_dir: str | None = None, skip_corrupt: bool = False):
        self.root = root
        self.source = ("folder" if root else "cifar10") if source == "auto" else source
        self._cache_dir = cache_dir
        self.skip_corrupt = skip_corrupt

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

    def load_split(self, split: str) -> Split:
        """One split (``train`` or ``test``) as uint8 arrays (a folder is decoded here on first use)."""
        if self.source == "cifar10":
            return load_cifar10_split(self.data_root, split)
        return load_folder_split(self.data_root, split, folder_classes(self.data_root), self.cache_dir,
                                 skip_corrupt=self.skip_corrupt)

    def load_splits(self) -> dict[str, Split]:
        """The train and test splits as uint8 arrays."""
        return {s: self.load_split(s) for s in ("train", "test")}

    @cached_property
    def test_set(self) -> ImageArrayDataset:
        """The test split, loaded on first use (what evaluation needs: the training split stays on disk)."""
        test = self.load_split("test")
        return ImageArrayDataset(test.images, test.labels)
