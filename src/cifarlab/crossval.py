"""``cifarlab audit``: out-of-sample probabilities for every training image, by K-fold cross-validation.

cleanlab needs probabilities from a model that never trained on the image. For the test set any checkpoint gives
them; for the training set the recipe is trained K times, each time without one fold, and each fold's images are
classified (with the recipe's TTA, as everywhere) by the model that did not see them:

    cifarlab audit --config configs/fast.yaml --folds 2 [--data.root DIR] [--budget 10m] [any fit flag]

Folds run as ordinary ``cifarlab fit`` runs, ``<run.dir>/audit-k<K>/fold<k>/<run.name>/version_<n>/``; a fold whose
run finished (``test_metrics.json`` written) with the same flags on the same training labels is reused, so an
interrupted audit resumes. With ``--budget``, each fold gets an equal share. The result is one file in the data's
cache folder, ``train-oof-<recipe>-k<K>-<N>.npz`` (see ``write_train_oof``), which the app's "Likely mislabeled" tab
and ``cifarlab report`` pick up (``find_train_oof``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifarlab.errors import CifarlabError
from cifarlab.progress import progress
from cifarlab.runs import Run

if TYPE_CHECKING:
    from cifarlab.data import Split

PREDICT_BATCH = 1000  # held-out images per forward pass (no gradients)
MARKER = "audit.json"  # in a fold's run folder: the flags it was trained with, written once fit and test are done


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` (the last one wins, as in the parser)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _without(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``--name VALUE`` / ``--name=VALUE``."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == name and i + 1 < len(argv):
            skip = True
        elif not arg.startswith(name + "="):
            out.append(argv[i])
    return out


def audit_plan(argv: list[str]) -> tuple[int, list[str], Path, float | None]:
    """``cifarlab audit``'s arguments -> ``(folds, fit_args, base, budget_share)``: the flags every fold's ``fit``
    gets (``--budget`` replaced by its share, seconds; no ``--run.dir``), and the folder the folds' runs go under."""
    from cifarlab.budget import parse_budget

    folds_text = _option(argv, "--folds")
    folds = int(folds_text) if folds_text is not None and folds_text.strip().isdigit() else None
    if folds is None or folds < 2:
        raise CifarlabError(f"--folds {folds_text}: give the number of cross-validation folds, 2 or more "
                            "(e.g. --folds 2; each fold trains the recipe once)")
    if _option(argv, "--config") is None:
        raise CifarlabError("cifarlab audit needs a recipe: --config configs/fast.yaml (any fit flag may follow)")
    if _option(argv, "--data.folds") is not None or _option(argv, "--data.fold") is not None:
        raise CifarlabError("cifarlab audit sets --data.folds and --data.fold itself: pass --folds K only")
    if _option(argv, "--ckpt_path") is not None:
        # One checkpoint that saw every image would leak each fold's held-out images into its model.
        raise CifarlabError("cifarlab audit trains every fold from scratch: drop --ckpt_path (an interrupted audit "
                            "resumes by running the same command again)")
    fit_args = _without(argv, "--folds")
    share = None
    budget = _option(fit_args, "--budget")
    if budget is not None:
        share = parse_budget(budget) / folds
        fit_args = [*_without(fit_args, "--budget"), "--budget", f"{share:.6g}"]
    base = Path(_option(fit_args, "--run.dir") or _option(fit_args, "--trainer.default_root_dir") or "runs")
    fit_args = _without(_without(fit_args, "--run.dir"), "--trainer.default_root_dir")
    return folds, fit_args, base / f"audit-k{folds}", share


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


def find_train_oof(cache_dir: Path, labels: np.ndarray, classes: list[str]) -> tuple[Path, dict] | None:
    """The newest ``train-oof-*.npz`` in ``cache_dir`` made for exactly these training ``labels`` and ``classes``, as
    ``(path, arrays)`` (keys as ``write_train_oof`` writes them); ``None`` when there is none."""
    files = sorted(Path(cache_dir).glob("train-oof-*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            same = (list(data["classes"]) == list(classes) and np.array_equal(data["labels"], labels)
                    and data["probs"].shape == (len(labels), len(classes)))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            continue  # damaged or foreign: the app must start anyway
        if same:
            return path, data
    return None


def write_train_oof(cache_dir: Path, recipe: str, probs: np.ndarray, labels: np.ndarray, fold: np.ndarray,
                    classes: list[str], ckpt_paths: list[Path]) -> Path:
    """Write ``<cache_dir>/train-oof-<recipe>-k<K>-<N>.npz`` atomically: ``probs`` (N, C) float16 out-of-sample
    probabilities, ``labels`` (N,) int64, ``fold`` (N,) int64 (the fold each image was held out in), ``classes``
    (C,) str, ``recipe`` str, ``folds`` int, ``ckpt_paths`` (K,) str (fold k's model). Rows are the training split
    in the order of ``CIFARDataModule.load_splits()["train"]``."""
    folds = len(ckpt_paths)
    out = Path(cache_dir) / f"train-oof-{recipe}-k{folds}-{len(labels)}.npz"
    tmp = out.with_name(f".{out.name}.tmp")  # not matched by find_train_oof's pattern while it is being written
    with open(tmp, "wb") as file:
        np.savez(file, probs=probs.astype(np.float16), labels=labels.astype(np.int64), fold=fold.astype(np.int64),
                 classes=np.array(classes, dtype=str), recipe=np.array(recipe), folds=np.array(folds),
                 ckpt_paths=np.array([str(p) for p in ckpt_paths], dtype=str))
    os.replace(tmp, out)  # the app never reads half a file
    return out


def fold_data(ckpt: Path):
    """``(model, datamodule, training split)`` of a fold's checkpoint: the data rebuilt from its hyperparameters (its
    root, split seed and folds), read as it is now."""
    from cifarlab.checkpoint import load_classifier
    from cifarlab.data import CIFARDataModule

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


def train_fold(fit_args: list[str], folder: Path, folds: int, fold: int) -> Path:
    """Run ``cifarlab fit`` for one fold under ``folder``, mark its run as this audit's, and return its last.ckpt."""
    from cifarlab.cli import main as cli_main  # the whole fit command, flags and errors included

    before = set(folder.glob("*/version_*"))
    cli_main(["fit", *fit_args, "--run.dir", str(folder), "--data.folds", str(folds), "--data.fold", str(fold)])
    new = [d for d in folder.glob("*/version_*") if d not in before and (d / "test_metrics.json").is_file()
           and Run(d).last_checkpoint.is_file()]
    if not new:
        raise CifarlabError(f"fold {fold} did not finish (no test_metrics.json under {folder}): run the same command "
                            "again to resume")
    run = Run(max(new, key=lambda d: d.stat().st_mtime_ns))
    _, _, train = fold_data(run.last_checkpoint)
    marker = {"folds": folds, "fold": fold, "fit_args": fit_args,
              "labels_sha1": labels_digest(train.labels, train.classes)}
    (run.dir / MARKER).write_text(json.dumps(marker, indent=1))
    return run.last_checkpoint


def predict_heldout(ckpt: Path, folds: int, fold: int, device: str) -> tuple[np.ndarray, np.ndarray, Split, Path]:
    """Fold ``fold``'s model on the images it was held out from: ``(indices into the training split, probs (n, C),
    the training split, the data's cache folder)``, the data rebuilt from the checkpoint (its root, split seed and
    folds)."""
    import torch

    from cifarlab.inference import classify

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


def audit_main(argv: list[str]) -> None:
    """``cifarlab audit``: train the recipe once per fold, classify each fold's held-out images, write the file."""
    import torch

    from cifarlab.budget import format_seconds

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    folds, fit_args, base, share = audit_plan(argv)
    if share is not None:
        print(f"cifarlab audit: --budget {_option(argv, '--budget')} shared by {folds} folds: "
              f"{format_seconds(share)} each", flush=True)
    ckpts = []
    for k in range(folds):
        folder = base / f"fold{k}"
        last = finished_run(folder, fit_args)
        if last is not None and not same_labels(last):
            print(f"cifarlab audit: fold {k + 1}/{folds}: the training labels changed since {last} was trained",
                  flush=True)
            last = None
        if last is None:
            print(f"cifarlab audit: fold {k + 1}/{folds}: training without fold {k} -> {folder}", flush=True)
            last = train_fold(fit_args, folder, folds, k)
        else:
            print(f"cifarlab audit: fold {k + 1}/{folds}: reusing the finished run {last}", flush=True)
        ckpts.append(last.resolve())  # the file records them: absolute, for the app started elsewhere

    # Prediction only: a GPU if there is one (the fits chose theirs through the recipe's trainer flags).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probs = labels = fold_of = None
    for k, ckpt in enumerate(ckpts):
        heldout, fold_probs, train, data_cache = predict_heldout(ckpt, folds, k, device)
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
    out = write_train_oof(cache_dir, Run.of_checkpoint(ckpts[0]).name, probs, labels, fold_of, classes, ckpts)
    accuracy = float((probs.argmax(1) == labels).mean())
    print(f"cifarlab audit: {out} ({len(labels)} training images, out-of-sample accuracy {accuracy:.2%}); "
          "`cifarlab app` and `cifarlab report` show the training set's likely label errors from it", flush=True)
