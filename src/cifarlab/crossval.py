"""Cross-validation of the training set: out-of-sample probabilities for every training image.

cleanlab needs probabilities from a model that never trained on the image. For the test set any checkpoint gives
them; for the training set the recipe is trained K times, each time without one fold (``cifarlab audit``,
``commands/audit.py``), and each fold's images are classified (with the recipe's TTA, as everywhere) by the model
that did not see them (``out_of_sample``).

A fold's run is marked as finished by the audit (``mark_fold``: its flags and a digest of its training labels), so
a run with the same flags on the same labels is reused (``finished_run``, ``same_labels``). The result is one file
in the data's cache folder, ``train-oof-<recipe>-k<K>-<N>.npz`` (``write_train_oof``), which the app's "Likely
mislabeled" tab and ``cifarlab report`` pick up (``find_train_oof``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cifarlab.checkpoint import load_classifier
from cifarlab.data import CIFARDataModule, Split
from cifarlab.errors import CifarlabError
from cifarlab.files import write_json
from cifarlab.inference import classify
from cifarlab.progress import progress
from cifarlab.runs import Run

PREDICT_BATCH = 1000  # held-out images per forward pass (no gradients)
MARKER = "audit.json"  # in a fold's run folder: the flags it was trained with, written once fit and test are done


def finished_run(folder: Path, fit_args: list[str] | None = None) -> Path | None:
    """The ``last.ckpt`` of the newest run under ``folder`` (one fold's) that finished, fit and test, and was trained
    with exactly ``fit_args`` (its ``audit.json``; any finished run when ``None``)."""
    runs = sorted(folder.glob("*/version_*/test_metrics.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for metrics in runs:
        run = Run(metrics.parent)
        if not run.last_checkpoint.is_file():
            continue
        if fit_args is not None:
            try:
                marker = json.loads((run.dir / MARKER).read_text())
            except (OSError, ValueError):
                continue  # not finished by `cifarlab audit`, or from an older version of it
            if marker.get("fit_args") != list(fit_args):
                continue  # another recipe or other flags: not this audit's fold
        return run.last_checkpoint
    return None


def fold_data(ckpt: Path):
    """``(model, datamodule, training split)`` of a fold's checkpoint: the data rebuilt from its hyperparameters (its
    root, split seed and folds), read as it is now."""
    model = load_classifier(ckpt)
    settings = {k: v for k, v in model.datamodule_hparams.items() if k != "augment" and not k.startswith("_")}
    dm = CIFARDataModule(**settings)
    return model, dm, dm.load_splits()["train"]


def labels_digest(labels: np.ndarray, classes: list[str]) -> str:
    """Identifies a training split's labels: with the split seed (a flag), they decide every image's fold."""
    return hashlib.sha1(np.asarray(labels, dtype=np.int64).tobytes() + "\0".join(classes).encode()).hexdigest()


def same_labels(ckpt: Path) -> bool:
    """Whether the data a fold's run was trained on still has the labels it had then (after relabelling images the
    folds change, and a reused model would have trained on images it is now asked about)."""
    try:
        marker = json.loads((Run.of_checkpoint(ckpt).dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    _, _, train = fold_data(ckpt)
    return marker.get("labels_sha1") == labels_digest(train.labels, train.classes)


def mark_fold(run: Run, folds: int, fold: int, fit_args: list[str]) -> None:
    """Record in a finished fold's run the flags it was trained with and its training labels: ``finished_run`` and
    ``same_labels`` reuse it only for the same audit on the same labels."""
    _, _, train = fold_data(run.last_checkpoint)
    write_json({"folds": folds, "fold": fold, "fit_args": fit_args,
                "labels_sha1": labels_digest(train.labels, train.classes)}, run.dir / MARKER)


def predict_heldout(ckpt: Path, folds: int, fold: int, device: str) -> tuple[np.ndarray, np.ndarray, Split, Path]:
    """Fold ``fold``'s model on the images it was held out from: ``(indices into the training split, probs (n, C),
    the training split, the data's cache folder)``, the data rebuilt from the checkpoint (its root, split seed and
    folds)."""
    model, dm, train = fold_data(ckpt)
    model.to(torch.device(device))
    if (dm.folds, dm.fold) != (folds, fold):
        raise CifarlabError(f"{ckpt} was trained as fold {dm.fold} of {dm.folds}, not fold {fold} of {folds}: remove "
                            "it and run the audit again")
    heldout = dm.heldout_indices(train.labels)
    probs = np.zeros((len(heldout), len(model.class_names)), dtype=np.float32)
    starts = range(0, len(heldout), PREDICT_BATCH)
    for start in progress(starts, f"fold {fold}: classifying {len(heldout)} held-out images", unit="batch"):
        rows = heldout[start:start + PREDICT_BATCH]
        x = torch.from_numpy(train.images[rows]).permute(0, 3, 1, 2).contiguous()
        probs[start:start + len(rows)] = classify(model, x).numpy()
    return heldout, probs, train, dm.cache_dir


def out_of_sample(ckpts: list[Path], base: Path, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       list[str], Path]:
    """Every training image classified by the fold's model that did not train on it (``ckpts[k]``: fold k's):
    ``(probs (N, C), labels (N,), fold of each image (N,), classes, the data's cache folder)``; ``base`` is the
    audit's folder, named in the errors."""
    probs = labels = fold_of = classes = cache_dir = None
    for k, ckpt in enumerate(ckpts):
        heldout, fold_probs, train, data_cache = predict_heldout(ckpt, len(ckpts), k, device)
        if probs is None:
            labels, classes, cache_dir = np.asarray(train.labels, dtype=np.int64), list(train.classes), data_cache
            probs = np.zeros((len(labels), len(classes)), dtype=np.float32)
            fold_of = np.full(len(labels), -1, dtype=np.int64)
        elif not np.array_equal(train.labels, labels) or list(train.classes) != classes:
            raise CifarlabError(f"fold {k}'s run was trained on other data than fold 0's ({ckpt}): remove {base} "
                                "and run the audit again")
        probs[heldout] = fold_probs
        fold_of[heldout] = k
    if (fold_of < 0).any():
        raise CifarlabError(f"the folds' runs do not cover every training image: remove {base} and run the audit again")
    return probs, labels, fold_of, classes, cache_dir
