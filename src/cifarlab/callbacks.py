"""Callbacks: per-epoch throughput, checkpoints on interruption, RNG state in checkpoints, and the fast recipe's
Lookahead. (The end-of-test report, which draws, is ``cifarlab.fit_report.TestReport``.)"""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifarlab.files import atomic_path
from cifarlab.runs import LAST


class EpochSpeed(L.Callback):
    """Logs ``train_img_per_s`` (training images per second of the epoch's wall time) and ``elapsed_s``."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._images = 0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        # Every rank sees its own share of the batches: the run's throughput is world_size times this one's.
        images = self._images * trainer.world_size
        pl_module.log("train_img_per_s", images / max(now - self._start, 1e-9))
        pl_module.log("elapsed_s", now - self._fit_start)


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C or SIGTERM during ``fit``, writes ``last.ckpt`` where it is, mid-epoch, before the run stops, so
    ``cifarlab fit ... --ckpt_path last`` resumes at the same global step with the optimizer, LR schedule and RNG
    state of the moment. The file is written beside and then renamed, so an interrupted save never leaves a
    truncated ``last.ckpt``. (Lightning's ``OnExceptionCheckpoint`` needs its folder before the run folder
    exists, saves on any error, NaN losses included, and writes in place.)"""

    def __init__(self, filename: str = LAST):
        self.filename = filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking  # validation included
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not fitting:
            return
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size > 1:
            # Raised at a different line on each rank (a second Ctrl-C): a collective save could never meet.
            rank_zero_info("stopped at once: last.ckpt not saved (the last saved checkpoints are intact)")
            return
        folder = next((c.dirpath for c in trainer.checkpoint_callbacks
                       if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if folder is None:
            return
        final = Path(folder) / f"{self.filename}.ckpt"
        # The full state; every rank takes part in the save, rank 0 writes it.
        if not trainer.is_global_zero:
            trainer.save_checkpoint(final, weights_only=False)
            return
        with atomic_path(final, suffix=".tmp") as tmp:  # (not *.ckpt: a stray one is never taken for a checkpoint)
            trainer.save_checkpoint(tmp, weights_only=False)
        rank_zero_info(f"interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {final}; "
                       "resume with the same command and --ckpt_path last")


class RNGState(L.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) random states in checkpoints and restores them on resume,
    so a resumed run draws the same shuffles and augmentations as one that was never stopped (from the next
    epoch on; a run stopped mid-epoch reshuffles the rest of that epoch). Stored as tensors and lists, which
    ``torch.load(weights_only=True)`` accepts."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, py_state, py_gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                "python": [version, list(py_state), py_gauss]}

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, py_state, py_gauss = state_dict["python"]
        random.setstate((version, tuple(py_state), py_gauss))


class TestEveryEpoch(L.Callback):
    """Benchmarks only: test accuracy after every epoch (``epoch_test_acc``, no TTA) for learning curves, and
    the cumulative seconds these passes took (``epoch_test_s``).

    It never feeds model selection (checkpoints monitor ``val_acc``); add it with
    ``--trainer.callbacks+=cifarlab.callbacks.TestEveryEpoch``.
    """

    def __init__(self):
        self.seconds = 0.0  # spent in these extra test passes, so benchmarks can leave it out of wall times

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the epoch's validation, if any (recipes with val_size 0 have none).
        if trainer.datamodule is None:
            return
        start = time.perf_counter()
        correct = total = 0
        pl_module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for x, y in trainer.datamodule.test_dataloader():
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                correct += (pl_module(x).argmax(1) == y).sum().item()
                total += len(y)
        pl_module.train()
        self.seconds += time.perf_counter() - start
        pl_module.log("epoch_test_acc", correct / max(total, 1))
        pl_module.log("epoch_test_s", self.seconds)  # cumulative


class Lookahead(L.Callback):
    """airbench's Lookahead: every ``every`` steps the slow weights move toward the fast ones by ``1 - decay``
    and the fast weights restart from them; ``decay`` grows as ``decay_max * (step / total) ** power``, so
    averaging is strongest at the end. At the last step the model keeps the slow weights (before the last
    validation, so checkpoints and the test see them).

    Args:
        every: optimizer steps between updates.
        decay_max: decay reached at the last step (airbench: 0.95 ** 5).
        power: shape of the decay ramp (airbench: 3).
    """

    def __init__(self, every: int = 5, decay_max: float = 0.95**5, power: float = 3.0):
        self.every, self.decay_max, self.power = every, decay_max, power
        self.slow: dict[str, torch.Tensor] = {}

    def _floating_state(self, pl_module):
        return {k: v for k, v in pl_module.state_dict().items() if v.is_floating_point()}

    def on_train_start(self, trainer, pl_module) -> None:
        # After on_fit_start (the whitening init); a resumed run keeps the slow weights it restored.
        if not self.slow:
            self.slow = {k: v.detach().clone() for k, v in self._floating_state(pl_module).items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        if step >= total:
            decay = 1.0  # the end: take the slow weights
        elif step % self.every == 0:
            decay = self.decay_max * (step / total) ** self.power
        else:
            return
        for key, fast in self._floating_state(pl_module).items():
            slow = self.slow[key]
            slow.lerp_(fast, 1 - decay)
            fast.copy_(slow)

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    def load_state_dict(self, state_dict: dict) -> None:
        self.slow = state_dict["slow"]


def last_checkpoint() -> ModelCheckpoint:
    """Writes ``last.ckpt`` after every epoch. (Lightning 2.6's ``save_last=True`` only refreshes it when a
    top-k checkpoint is saved, so a run whose best epoch is not its final one would have a stale "last".)"""
    return ModelCheckpoint(filename=LAST, monitor=None, save_top_k=1, enable_version_counter=False)
