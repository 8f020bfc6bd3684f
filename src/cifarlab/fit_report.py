"""The report written at the end of ``cifarlab fit``/``test``: metrics, predictions and figures in the run directory.

A front end of the training run: it draws with ``cifarlab.plots`` (matplotlib), which the training layer
(module, data, callbacks, budget) never imports.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from cifarlab import plots
from cifarlab.checkpoint import weights_digest
from cifarlab.files import save_predictions, write_json
from cifarlab.metrics import metrics_from_confusion


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
        metrics = metrics_from_confusion(confmat, classes, test_loss)
        metrics["ckpt_path"] = trainer.ckpt_path
        write_json(metrics, out / "test_metrics.json")
        probs = getattr(pl_module, "test_probs", None)
        # (N, K) for the test set in order (its first N images under limit_test_batches); under DDP each rank
        # holds only its share
        probs = torch.cat(probs).numpy() if probs and trainer.world_size == 1 and getattr(dm, "test_set", None) \
            is not None else None
        if probs is not None and len(probs) == len(dm.test_set):
            # The app and `cifarlab report` reuse these instead of running the test set again (only a whole test
            # set: --trainer.limit_test_batches tests part of it).
            # The digest of the tested weights lets another file with the same weights (last.ckpt) reuse them too.
            save_predictions(out / "test_predictions.npz", probs, dm.test_set.labels.numpy(), classes,
                             trainer.ckpt_path or "", weights=weights_digest(pl_module.state_dict()))
        plots.plot_confusion(confmat, classes, out / "confusion_matrix.png")
        self._to_tensorboard(trainer, out, classes, probs)
        csv_file = out / "metrics.csv"
        if csv_file.exists():
            plots.plot_curves(csv_file, out / "curves.png")
        rank_zero_info(f"test accuracy: {metrics['test_acc']:.4f} on {metrics['num_images']} images "
                       f"-> {out / 'test_metrics.json'}")

    def _to_tensorboard(self, trainer: L.Trainer, out: Path, classes: list[str], probs) -> None:
        """The confusion matrix and a captioned grid of the most confidently wrong test images, as images of the
        TensorBoard logger (if there is one) at the run's last step. A failure here is a warning: the files above
        are the report, TensorBoard a copy."""
        board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if board is None:
            return
        try:
            self._add_images(board.experiment, trainer, out, classes, probs)
        except Exception as err:  # e.g. a TensorBoard writer without add_image, a full disk
            rank_zero_warn(f"the test confusion matrix and mistakes were not logged to TensorBoard: {err!r}")

    def _add_images(self, writer, trainer: L.Trainer, out: Path, classes: list[str], probs) -> None:
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
                    plots.save_image_grid(test.images[wrong], captions, grid,
                                           title="Most confidently wrong test images (true -> predicted, confidence)")
                    add_png("test/mistakes", grid)
                writer.add_text("test/mistakes", "\n".join(f"- image {i}: {c}" for i, c in zip(wrong, captions)),
                                trainer.global_step)
        writer.flush()
