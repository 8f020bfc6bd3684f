"""Callbacks: the end-of-test report, per-epoch throughput, checkpoints on interruption, RNG state in checkpoints,
and the fast recipe's Lookahead."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifarlab import report
from cifarlab.runs import LAST


class TestReport(L.Callback):
    """After ``test``: ``test_metrics.json``, ``test_predictions.npz``, ``confusion_matrix.png`` and ``curves.png``
    in the run directory; with a TensorBoard logger, the confusion matrix (``test/confusion_matrix``) and the most
    confidently wrong test images (``test/mistakes``) in TensorBoard's Images tab too."""

    mistakes_shown = 32  # images in the TensorBoard mistakes grid

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Both are collective under DDP (a metric sync, a broadcast of the folder): every rank takes part.
        confmat = pl_module.test_confmat.compute().cpu().numpy()
        out = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        dm = trainer.datamodule
        classes = getattr(dm, "classes", None) or [str(i) for i in range(len(confmat))]
        test_loss = float(trainer.callback_metrics.get("test_loss", float("nan")))
        metrics = report.metrics_from_confusion(confmat, classes, test_loss)
        metrics["ckpt_path"] = trainer.ckpt_path
        report.write_json(metrics, out / "test_metrics.json")
        probs = getattr(pl_module, "test_probs", None)
        # (N, K) for the test set in order (its first N images under limit_test_batches); under DDP each rank
        # holds only its share
        probs = torch.cat(probs).numpy() if probs and trainer.world_size == 1 and getattr(dm, "test_set", None) \
            is not None else None
        if probs is not None and len(probs) == len(dm.test_set):
            # The app and `cifarlab report` reuse these instead of running the test set again (only a whole test
            # set: --trainer.limit_test_batches tests part of it).
            report.save_predictions(out / "test_predictions.npz", probs, dm.test_set.labels.numpy(), classes,
                                    trainer.ckpt_path or "")
        report.plot_confusion(confmat, classes, out / "confusion_matrix.png")
        self._to_tensorboard(trainer, out, classes, probs)
        csv_file = out / "metrics.csv"
        if csv_file.exists():
            report.plot_curves(csv_file, out / "curves.png")
        rank_zero_info(f"test accuracy: {metrics['test_acc']:.4f} on {metrics['num_images']} images "
                       f"-> {out / 'test_metrics.json'}")

    def _to_tensorboard(self, trainer: L.Trainer, out: Path, classes: list[str], probs) -> None:
        """The confusion matrix and a captioned grid of the most confidently wrong test images, as images of the
        TensorBoard logger (if there is one) at the run's last step. A failure here is a warning: the files above
        are the report, TensorBoard a copy."""
        from lightning.pytorch.loggers import TensorBoardLogger

        board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if board is None:
            return
        try:
            self._add_images(board.experiment, trainer, out, classes, probs)
        except Exception as err:  # e.g. a TensorBoard writer without add_image, a full disk
            rank_zero_warn(f"the test confusion matrix and mistakes were not logged to TensorBoard: {err!r}")

    def _add_images(self, writer, trainer: L.Trainer, out: Path, classes: list[str], probs) -> None:
        import tempfile

        from PIL import Image

        def add_png(tag: str, path: Path) -> None:
            pixels = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
            writer.add_image(tag, pixels, trainer.global_step, dataformats="HWC")

        add_png("test/confusion_matrix", out / "confusion_matrix.png")
        if probs is not None:
            test = trainer.datamodule.test_set
            # The test loader is in order; --trainer.limit_test_batches tests only the first len(probs) images.
            labels, preds, confidence = test.labels.numpy()[: len(probs)], probs.argmax(1), probs.max(1)
            wrong = np.flatnonzero(preds != labels)
            wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][: self.mistakes_shown]
            if len(wrong):
                captions = [f"{classes[labels[i]]} -> {classes[preds[i]]} {confidence[i]:.0%}" for i in wrong]
                with tempfile.TemporaryDirectory() as tmp:
                    grid = Path(tmp) / "mistakes.png"
                    report.save_image_grid(test.images[wrong], captions, grid,
                                           title="Most confidently wrong test images (true -> predicted, confidence)")
                    add_png("test/mistakes", grid)
                writer.add_text("test/mistakes", "\n".join(f"- image {i}: {c}" for i, c in zip(wrong, captions)),
                                trainer.global_step)
        writer.flush()


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
        tmp = final.with_name(final.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state; every rank takes part, rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, final)
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
