"""The LightningModule: preprocessing + network, loss, metrics, optimizer and OneCycle schedule."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifarlab.errors import ConfigError
from cifarlab.models import build_model
from cifarlab.optim import Muon
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
        widths: channels of the network's three conv groups, for architectures that take them (airbench:
            64/256/256 by default; airbench95's 128/384/384 cost ~2.5x the FLOPs per image).
        optimizer: ``adam`` (the seed), ``sgd`` (Nesterov momentum), or ``muon``: conv filters trained with Muon
            (``cifarlab.optim.Muon``), every other parameter with SGD as for ``sgd``.
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
        bn_lr_scale: LR multiplier for BatchNorm parameters; their weight decay is divided by it, so that
            LR x decay stays the same (airbench: 64, with frozen BN scales, i.e. for the BN biases).
        tta_level: test-time augmentation at test time: 0 none, 1 + mirror, 2 + mirror of 1-px translations.
        whiten_bias_epochs: epochs during which a whitening conv's bias trains, then it is frozen (airbench: 3).
        whiten_bias_lr_scale: LR multiplier for a whitening conv's bias, its weight decay divided by it as for
            ``bn_lr_scale`` (airbench94: 1, with the head; airbench94_muon: 64, with the BN biases).
        whiten_bias_decay: the whitening bias's LR falls linearly from its scheduled value to 0 at the end of
            epoch ``whiten_bias_epochs`` instead of stopping there abruptly (airbench94_muon).
        muon_lr: peak learning rate of the Muon-trained filters (their update is orthogonalised, so this is a
            step size relative to the normalised weights, independent of the loss scale; airbench: 0.24).
        muon_momentum: momentum of the Muon-trained filters (airbench: 0.6).
        muon_ns_steps: Newton-Schulz iterations per Muon update (airbench: 3).
    """

    def __init__(
        self,
        arch: str = "custom_resnet",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        logit_scale: float = 1.0,
        widths: list[int] | None = None,
        optimizer: Literal["adam", "sgd", "muon"] = "adam",
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
        bn_lr_scale: float = 1.0,
        tta_level: int = 0,
        whiten_bias_epochs: int = 3,
        whiten_bias_lr_scale: float = 1.0,
        whiten_bias_decay: bool = False,
        muon_lr: float = 0.24,
        muon_momentum: float = 0.6,
        muon_ns_steps: int = 3,
    ):
        super().__init__()
        if optimizer == "muon" and cycle_momentum and scheduler == "onecycle":
            raise ConfigError("cycle_momentum would overwrite muon_momentum: with --model.optimizer muon, "
                             "set --model.cycle_momentum false")
        if class_names is not None:
            num_classes = len(class_names)
        self.save_hyperparameters()
        self.hparams.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.normalize = Normalize()
        self.net = build_model(arch, num_classes, widths=widths, logit_scale=logit_scale)
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

    def on_fit_start(self) -> None:
        # Patch-whitening networks start from the training data's patch covariance (not on resume: the
        # checkpoint's weights were restored before this hook).
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(self.net, "init_whitening") and self.trainer.ckpt_path is None and dm is not None:
            x, _ = dm.train_set.batch(range(min(5000, len(dm.train_set))))  # airbench: 5,000 images
            self.net.init_whitening(self.normalize(x.to(self.device)))

    def on_train_epoch_start(self) -> None:
        if hasattr(self.net, "whiten") and self.net.whiten.bias is not None:
            self.net.whiten.bias.requires_grad_(self.current_epoch < self.hparams.whiten_bias_epochs)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.hparams.whiten_bias_decay and self.current_epoch < self.hparams.whiten_bias_epochs:
            # The scheduler sets each group's LR from scratch every step, so scaling its last value cannot compound.
            opt = self.optimizers(use_pl_optimizer=False)
            found = [i for i, g in enumerate(opt.param_groups) if g.get("whiten_bias")]
            if not found:
                return
            i, sched = found[0], self.lr_schedulers()
            peak = self.hparams.lr * self.hparams.whiten_bias_lr_scale
            scheduled = sched.get_last_lr()[i] if sched is not None else peak
            span = self.hparams.whiten_bias_epochs * self.trainer.num_training_batches  # optimizer steps
            opt.param_groups[i]["lr"] = scheduled * max(0.0, 1 - self.global_step / span)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        x = self.normalize(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def tta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over test-time views of uint8 images ``x`` (level from ``tta_level``)."""
        level = self.hparams.tta_level
        if level == 0:
            return self(x)
        mirror = 0.5 * (self(x) + self(x.flip(-1)))
        if level == 1:
            return mirror
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]  # one pixel up-left and down-right
        translated = torch.stack([0.5 * (self(v) + self(v.flip(-1))) for v in shifted]).mean(0)
        return 0.5 * mirror + 0.5 * translated

    def _step(self, batch, tta: bool = False):
        x, y = batch
        logits = self.tta_logits(x) if tta else self(x)
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
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)  # averaged over DDP ranks (metrics sync anyway)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.test_confmat.reset()
        self.test_probs: list[torch.Tensor] = []  # (B, K) per batch, for the saved predictions

    def test_step(self, batch, batch_idx: int) -> None:
        logits, y, loss = self._step(batch, tta=True)
        self.test_probs.append(logits.float().softmax(1).cpu())
        self.test_acc(logits, y)
        self.test_confmat.update(logits.argmax(1), y)
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.tta_logits(x).float().softmax(1)

    def param_groups(self) -> list[dict]:
        """Trainable parameters: BatchNorm's at ``lr * bn_lr_scale`` (decay / scale), the rest at ``lr``; with
        ``optimizer=muon``, conv filters in a group of their own at ``muon_lr``, ``muon_momentum``; a whitening
        bias in a group of its own (``whiten_bias=True``) when its LR differs from ``lr`` or decays early."""
        hp = self.hparams
        bn_ids = {id(p) for m in self.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                  for p in m.parameters()}
        # Frozen parameters (airbench's whitening weights, BN scales) are left out. The whitening bias is frozen
        # only from epoch `whiten_bias_epochs` on, so it is in: SGD skips it once it has no gradient.
        params = [p for p in self.parameters() if p.requires_grad]
        bn = [p for p in params if id(p) in bn_ids]
        other = [p for p in params if id(p) not in bn_ids]
        groups = []
        whiten = getattr(self.net, "whiten", None)
        whiten_bias = getattr(whiten, "bias", None)
        if whiten_bias is not None and (hp.whiten_bias_lr_scale != 1 or hp.whiten_bias_decay):
            # Only then: checkpoints of recipes without these options keep their optimizer's group layout.
            other = [p for p in other if p is not whiten_bias]
            scale = hp.whiten_bias_lr_scale
            groups.append({"params": [whiten_bias], "lr": hp.lr * scale, "weight_decay": hp.weight_decay / scale,
                           "whiten_bias": True})
        if hp.optimizer == "muon":
            filters = [p for p in other if p.ndim == 4]
            other = [p for p in other if p.ndim != 4]
            groups.append({"params": filters, "lr": hp.muon_lr, "momentum": hp.muon_momentum, "weight_decay": 0.0,
                           "muon": True, "ns_steps": hp.muon_ns_steps})
        groups.append({"params": other, "lr": hp.lr, "weight_decay": hp.weight_decay})
        if bn:
            scale = hp.bn_lr_scale
            groups.append({"params": bn, "lr": hp.lr * scale, "weight_decay": hp.weight_decay / scale})
        return groups

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``param_groups()`` (no schedule)."""
        hp = self.hparams
        groups = self.param_groups()
        if hp.optimizer == "adam":
            return torch.optim.Adam(groups)
        if hp.optimizer == "muon":
            return Muon(groups, momentum=hp.momentum, nesterov=hp.nesterov)
        return torch.optim.SGD(groups, momentum=hp.momentum, nesterov=hp.nesterov)

    def configure_optimizers(self):
        hp = self.hparams
        opt = self.make_optimizer()
        groups = opt.param_groups
        if hp.scheduler == "none":
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in groups], total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=hp.pct_start, anneal_strategy=hp.anneal_strategy, div_factor=hp.div_factor,
            final_div_factor=hp.final_div_factor, three_phase=hp.three_phase, cycle_momentum=hp.cycle_momentum)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

