"""The LightningModule: preprocessing + network, loss, metrics, optimizer and OneCycle schedule."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifarlab.models import build_model
from cifarlab.transforms import IMAGE_SIZE, Normalize


class ImageClassifier(L.LightningModule):
    """Classifies uint8 image batches ``(B, 3, 32, 32)``; normalisation is part of the model.

    Every argument is saved as a hyperparameter, and the dataset statistics are buffers, so
    ``ImageClassifier.load_from_checkpoint(path)`` rebuilds the whole model from the checkpoint alone.

    Args:
        arch: network name from ``cifarlab.models.ARCHITECTURES``.
        num_classes: output classes, when ``class_names`` is not given.
        class_names: names of the classes, in label order (the CLI takes them from the data).
        logit_scale: logits multiplier (Page's recipe: 0.125).
        optimizer: ``adam`` (the seed) or ``sgd`` (Nesterov momentum).
        lr: peak learning rate of the OneCycle schedule (``cifarlab lr-find`` suggests one).
        weight_decay: L2 coefficient applied by the optimizer to every parameter.
        momentum: SGD momentum (ignored by Adam, whose beta1 OneCycle may cycle instead).
        nesterov: Nesterov momentum for SGD.
        scheduler: ``onecycle`` (stepped every batch) or ``none`` (constant ``lr``).
        pct_start: fraction of all steps spent warming up to ``lr``.
        div_factor: the schedule starts at ``lr / div_factor``.
        final_div_factor: it ends at ``lr / div_factor / final_div_factor``.
        three_phase: OneCycle's third (annihilation) phase.
        anneal_strategy: shape of the ramps, ``linear`` or ``cos``.
        cycle_momentum: cycle momentum (SGD) or beta1 (Adam) inversely to the LR, between 0.85 and 0.95.
        label_smoothing: cross-entropy label smoothing.
        channels_last: NHWC memory format; faster for convolutions on CPU (oneDNN) and tensor cores.
    """

    def __init__(
        self,
        arch: str = "custom_resnet",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        logit_scale: float = 1.0,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        nesterov: bool = True,
        scheduler: Literal["onecycle", "none"] = "onecycle",
        pct_start: float = 5 / 24,
        div_factor: float = 100.0,
        final_div_factor: float = 100.0,
        three_phase: bool = False,
        anneal_strategy: Literal["linear", "cos"] = "linear",
        cycle_momentum: bool = True,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
    ):
        super().__init__()
        if class_names is not None:
            num_classes = len(class_names)
        self.save_hyperparameters()
        self.hparams.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.normalize = Normalize()
        self.net = build_model(arch, num_classes, logit_scale=logit_scale)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.example_input_array = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def setup(self, stage: str) -> None:
        # Take the training data's statistics; a checkpoint restored after this overrides them with its own.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "mean", None) is not None:
            self.normalize.set_stats(dm.mean, dm.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        x = self.normalize(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        return logits, y, loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        logits, y, loss = self._step(batch)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        logits, y, loss = self._step(batch)
        self.val_acc(logits, y)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.test_confmat.reset()
        self.test_probs: list[torch.Tensor] = []  # (B, K) per batch, for the saved predictions

    def test_step(self, batch, batch_idx: int) -> None:
        logits, y, loss = self._step(batch)
        self.test_probs.append(logits.float().softmax(1).cpu())
        self.test_acc(logits, y)
        self.test_confmat.update(logits.argmax(1), y)
        self.log("test_loss", loss)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).float().softmax(1)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                  weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=hp.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=hp.pct_start, anneal_strategy=hp.anneal_strategy, div_factor=hp.div_factor,
            final_div_factor=hp.final_div_factor, three_phase=hp.three_phase, cycle_momentum=hp.cycle_momentum)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
