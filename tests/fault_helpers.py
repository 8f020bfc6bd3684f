"""Callbacks the fault tests load into `cifarlab fit` (``--trainer.callbacks+=``): in the test's own process, or in
subprocesses with this folder on PYTHONPATH."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L


class SlowAfter(L.Callback):
    """From global step ``step`` on: touch ``marker`` (so the test knows to send its signal) and sleep ``pause``
    seconds after every batch, so the signal lands mid-epoch rather than after the run has finished."""

    def __init__(self, step: int, marker: str, pause: float = 0.5):
        self.step, self.marker, self.pause = step, Path(marker), pause

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            self.marker.touch()
            time.sleep(self.pause)


class RankMetrics(L.Callback):
    """Each rank writes the metrics it logged after every validation to ``<folder>/rank<r>.json``."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["world_size"] = trainer.world_size
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


class SlowAt(L.Callback):
    """Makes one phase of a run slow, so a test's signal lands inside it: from training step ``step`` on, ``where``
    is ``train`` (after each training batch), ``val`` (each validation batch, after the sanity check), ``test``
    (each test batch) or ``save`` (each checkpoint save, on every rank). Rank 0 touches ``marker`` on arrival."""

    def __init__(self, where: str, marker: str, step: int = 0, pause: float = 0.5):
        self.where, self.marker, self.step, self.pause = where, Path(marker), step, pause

    def _arrive(self, trainer, where: str) -> None:
        if where != self.where or trainer.global_step < self.step or trainer.sanity_checking:
            return
        if trainer.global_rank == 0:
            self.marker.touch()
        time.sleep(self.pause)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._arrive(trainer, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._arrive(trainer, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._arrive(trainer, "test")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._arrive(trainer, "save")


class SignalAt(L.Callback):
    """Sends ``signum`` to this very process at the start of training step ``step``, as ``kill`` would: a one-process
    run stops at the end of that step (the signal path of a multi-process run, without a second process)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
