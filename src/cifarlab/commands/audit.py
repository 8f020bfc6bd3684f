"""``cifarlab audit``: out-of-sample probabilities for every training image, by K-fold cross-validation.

    cifarlab audit --config fast --folds 2 [--data.root DIR] [--budget 10m] [any fit flag]

Each fold is an ordinary ``cifarlab fit`` run, ``<run.dir>/audit-k<K>/fold<k>/<run.name>/version_<n>/``, trained
without fold k; a fold whose run finished with the same flags on the same training labels is reused, so an
interrupted audit resumes by running the same command again. With ``--budget``, each fold gets an equal share. The
result, ``train-oof-<recipe>-k<K>-<N>.npz`` in the data's cache folder, feeds the app's and the report's "Likely
mislabeled" view of the training set (``cifarlab.crossval``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cifarlab.audit import write_train_oof
from cifarlab.budget import format_seconds, parse_budget
from cifarlab.commands.fit import CifarLabCLI
from cifarlab.commands.recipe import RecipeCLI, option_value, without_options
from cifarlab.crossval import finished_run, mark_fold, out_of_sample, same_labels
from cifarlab.errors import CifarlabError
from cifarlab.runs import Run


def refuse_fold_flags(argv: list[str]) -> None:
    """The flags an audit sets itself or cannot honour, refused in one line."""
    if option_value(argv, "--data.folds") is not None or option_value(argv, "--data.fold") is not None:
        raise CifarlabError("cifarlab audit sets --data.folds and --data.fold itself: pass --folds K only")
    if option_value(argv, "--ckpt_path") is not None:
        # One checkpoint that saw every image would leak each fold's held-out images into its model.
        raise CifarlabError("cifarlab audit trains every fold from scratch: drop --ckpt_path (an interrupted audit "
                            "resumes by running the same command again)")


def audit_plan(argv: list[str], folds: int) -> tuple[list[str], Path, float | None]:
    """``cifarlab audit``'s arguments -> ``(fit_args, base, budget_share)``: the flags every fold's ``fit`` gets
    (``--budget`` replaced by its share, seconds; no ``--folds``, no ``--run.dir``), and the folder the folds' runs go
    under."""
    if folds < 2:
        raise CifarlabError(f"--folds {folds}: give the number of cross-validation folds, 2 or more "
                            "(e.g. --folds 2; each fold trains the recipe once)")
    if option_value(argv, "--config") is None:
        raise CifarlabError("cifarlab audit needs a recipe: --config fast (any fit flag may follow)")
    fit_args = without_options(argv, "--folds")
    share = None
    budget = option_value(fit_args, "--budget")
    if budget is not None:
        share = parse_budget(budget) / folds
        fit_args = [*without_options(fit_args, "--budget"), "--budget", f"{share:.6g}"]
    base = Path(option_value(fit_args, "--run.dir") or option_value(fit_args, "--trainer.default_root_dir") or "runs")
    fit_args = without_options(fit_args, "--run.dir", "--trainer.default_root_dir")
    return fit_args, base / f"audit-k{folds}", share


def train_fold(fit_args: list[str], folder: Path, folds: int, fold: int) -> Path:
    """Run ``cifarlab fit`` for one fold under ``folder``, mark its run as this audit's, and return its last.ckpt."""
    before = set(folder.glob("*/version_*"))
    # The fold's budget counts from the fold's start.
    CifarLabCLI(args=["fit", *fit_args, "--run.dir", str(folder), "--data.folds", str(folds), "--data.fold", str(fold)],
                start=time.time())
    new = [d for d in folder.glob("*/version_*") if d not in before and (d / "test_metrics.json").is_file()
           and Run(d).last_checkpoint.is_file()]
    if not new:
        raise CifarlabError(f"fold {fold} did not finish (no test_metrics.json under {folder}): run the same command "
                            "again to resume")
    run = Run(max(new, key=lambda d: d.stat().st_mtime_ns))
    mark_fold(run, folds, fold, fit_args)
    return run.last_checkpoint


def audit(cli: RecipeCLI, folds: int) -> Path:
    """Train the recipe once per fold, each time without that fold, and classify each fold's images with the model
    that did not train on them: out-of-sample probabilities of the whole training set, for the data audit.

    Args:
        folds: Cross-validation folds, 2 or more (each trains the recipe once).

    Returns the ``train-oof-*.npz`` file written.
    """
    fit_args, base, share = audit_plan(cli.args, folds)
    if share is not None:
        print(f"cifarlab audit: --budget {option_value(cli.args, '--budget')} shared by {folds} folds: "
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
    probs, labels, fold_of, classes, cache_dir = out_of_sample(ckpts, base, device)
    out = write_train_oof(cache_dir, Run.of_checkpoint(ckpts[0]).name, probs, labels, fold_of, classes, ckpts)
    accuracy = float((probs.argmax(1) == labels).mean())
    print(f"cifarlab audit: {out} ({len(labels)} training images, out-of-sample accuracy {accuracy:.2%}); "
          "`cifarlab app` and `cifarlab report` show the training set's likely label errors from it", flush=True)
    return out


def main(argv: list[str]) -> None:
    refuse_fold_flags(argv)  # before parsing: the recipe's parser has no --ckpt_path to explain
    RecipeCLI(audit, argv, build=False).run_command()  # parsed first: a bad flag fails before any fold trains
