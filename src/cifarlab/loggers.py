"""A run's loggers: TensorBoard and CSV in the run folder, then any the user adds (W&B, MLflow, ...)."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def run_loggers(root: Path, name: str, version: int, extra: list[Logger] | tuple[Logger, ...] = ()) -> list[Logger]:
    """TensorBoard + CSV logging into ``<root>/<name>/version_<version>/``, then ``extra``. The first logger's folder
    is the run's, so metrics.csv, curves.png and ``--ckpt_path last`` keep working whatever is added."""
    return [TensorBoardLogger(root, name=name, version=version, default_hp_metric=False),
            KeepingCSVLogger(root, name=name, version=version), *extra]


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it instead. Lightning has
    no public switch for this, so this overrides a private method (pinned in pyproject, its shape checked by
    tests/test_private_apis.py; the resume itself by tests/test_faults.py)."""

    # Private: replaces the check that deletes metrics.csv, https://github.com/Lightning-AI/pytorch-lightning/pull/19446
    def _check_log_dir_exists(self) -> None:
        fs = get_filesystem(self.metrics_file_path)
        if fs.isfile(self.metrics_file_path):
            with fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])  # save() appends under this header


class KeepingCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows already in ``metrics.csv`` (see ``_KeepingWriter``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        # Private: CSVLogger's save() and finalize() write through _experiment (fenced with the override above).
        if self._experiment is None:
            get_filesystem(self.root_dir).makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
