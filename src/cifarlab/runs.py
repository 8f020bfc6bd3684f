"""The run folder layout, known here only.

    <run.dir>/<run.name>/version_<n>/   one run: config.yaml, metrics.csv, events.out.tfevents.*, curves.png,
                                        test_metrics.json, test_predictions.npz, confusion_matrix.png, report/
                                        checkpoints/  last.ckpt (every epoch, and on interruption) + the best
    <run.dir>/<run.name>/lr_find/       the LR range test: lr_find.png, suggested_lr.yaml
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cifarlab.errors import CifarlabError

LAST = "last"  # file name (without .ckpt) of the checkpoint written every epoch and on interruption
VERSION_ENV = "CIFARLAB_RUN_VERSION"  # rank 0's run version, inherited by the DDP workers it starts


@dataclass(frozen=True)
class Run:
    """One run's ``version_<n>`` folder and the files in it."""

    dir: Path

    @classmethod
    def of_checkpoint(cls, ckpt_path: str | Path) -> Run:
        """The run a checkpoint belongs to (``<run>/checkpoints/<file>.ckpt``)."""
        return cls(Path(ckpt_path).expanduser().resolve().parent.parent)

    @property
    def name(self) -> str:
        """The recipe's ``run.name`` (the folder above ``version_<n>``)."""
        return self.dir.parent.name

    @property
    def version(self) -> int | None:
        suffix = self.dir.name.removeprefix("version_")
        return int(suffix) if self.dir.name.startswith("version_") and suffix.isdigit() else None

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / f"{LAST}.ckpt"

    @property
    def test_predictions(self) -> Path:
        return self.dir / "test_predictions.npz"

    def file(self, name: str) -> Path | None:
        """``config.yaml``, ``curves.png``, ``metrics.csv``, ``test_metrics.json``, ...: the path if it exists."""
        path = self.dir / name
        return path if path.is_file() else None

    @property
    def lr_find_plot(self) -> Path | None:
        """The LR range test's plot of this recipe, if ``cifarlab lr-find`` ran (in the run, or beside its versions)."""
        for path in (lr_find_dir(self.dir.parent.parent, self.name) / "lr_find.png", self.dir / "lr_find.png"):
            if path.is_file():
                return path
        return None


def lr_find_dir(run_dir: str | Path, name: str) -> Path:
    """Where ``cifarlab lr-find`` writes for recipe ``name`` under ``--run.dir``."""
    return Path(run_dir) / name / "lr_find"


def next_version(folder: Path) -> int:
    """The first unused ``version_<n>`` number under ``folder`` (``<run.dir>/<run.name>``)."""
    used = [Run(p).version for p in folder.glob("version_*")]
    return max((v for v in used if v is not None), default=-1) + 1


def latest_checkpoint(run_root: Path) -> Path | None:
    """The newest ``version_*/checkpoints/last.ckpt`` under ``run_root`` (written every epoch and on interruption)."""
    found = [p for p in run_root.glob(f"version_*/checkpoints/{LAST}.ckpt") if Run(p.parent.parent).version is not None]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, or raise a one-line error naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise CifarlabError(f"cannot write the run directory {folder} ({err.strerror or err}): "
                            "pass --run.dir to a writable folder with free space") from None


def run_root(run_dir: str, default_root_dir: str | None) -> str:
    """Where runs go: ``--run.dir``, or Lightning's ``--trainer.default_root_dir`` (where every Lightning user puts
    a run); both given and different is a one-line error."""
    if default_root_dir is None:
        return run_dir
    if run_dir not in ("runs", default_root_dir):
        raise CifarlabError(f"--trainer.default_root_dir {default_root_dir} and --run.dir {run_dir} both say where "
                            "the run goes: pass one of them")
    return default_root_dir


def resolve_last(folder: Path) -> Path:
    """``--ckpt_path last``: the newest ``last.ckpt`` of the recipe's runs under ``folder`` (Lightning would look in
    the new run's own, empty, folder), or a one-line error."""
    found = latest_checkpoint(folder)
    if found is None:
        raise CifarlabError(f"--ckpt_path last: no checkpoint under {folder}/version_*/checkpoints/: start the run "
                            "without --ckpt_path (or pass the --run.dir/--run.name it used)")
    return found


def claim_version(folder: Path, resume: int | None = None) -> int:
    """The ``version_<n>`` this process logs into under ``folder``: rank 0's (a DDP worker it started, through
    ``VERSION_ENV``), ``resume`` (a resumed run), else the next unused one. The folder is checked writable now,
    not when the first checkpoint is due."""
    if os.environ.get("LOCAL_RANK", "0") != "0" and VERSION_ENV in os.environ:
        version = int(os.environ[VERSION_ENV])
    elif resume is not None:
        version = resume
    else:
        version = next_version(folder)
    os.environ[VERSION_ENV] = str(version)
    check_writable(folder)
    return version
