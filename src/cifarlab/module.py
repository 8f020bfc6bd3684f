"""The LightningModule: the plain ``Classifier``'s prediction (preprocessing + network + TTA) with the loss,
metrics, optimizer and OneCycle schedule.

Its settings come in groups (``cifarlab.settings``), each a dataclass whose fields are the command-line flags
(``--model.optimizer.lr``, ``--model.schedule.pct_start``, ``--model.tta.level``), as ``AugmentConfig`` is for the data.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifarlab.classifier import Predicts, construct, load_weights, network
from cifarlab.errors import ConfigError
from cifarlab.optim import Muon, OneCycle
from cifarlab.selective import SelectiveBackpropConfig, evaluating, select_by_loss
from cifarlab.settings import (
    GROUPS,
    OptimizerConfig,
    ScheduleConfig,
    TTAConfig,
    WhiteningConfig,
    as_group,
    read_checkpoint_file,
    saved_settings,
)
from cifarlab.transforms import IMAGE_SIZE, Normalize

BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


class ImageClassifier(Predicts, L.LightningModule):
    """Classifies uint8 image batches ``(B, 3, 32, 32)``; normalisation is part of the model.

    Every argument is saved as a hyperparameter (the groups as plain dicts), and the dataset statistics are
    buffers, so ``ImageClassifier.load_from_checkpoint(path)`` rebuilds the whole model from the checkpoint alone.

    Args:
        arch: network name from ``cifarlab.models.ARCHITECTURES``.
        num_classes: output classes, when ``class_names`` is not given.
        class_names: names of the classes, in label order (the CLI takes them from the data).
        logit_scale: logits multiplier (Page's recipe: 0.125).
        widths: channels of the network's three conv groups, for architectures that take them (airbench:
            64/256/256 by default; airbench95's 128/384/384 cost ~2.5x the FLOPs per image).
        label_smoothing: cross-entropy label smoothing.
        channels_last: NHWC memory format; faster for convolutions on CPU (oneDNN) and tensor cores.
        activation: the conv groups' activation, for architectures that take one (airbench: ``gelu`` by default;
            hiverge's speedrun: ``silu``).
        bn_momentum: share of the running BatchNorm statistics kept each training step, for architectures that
            take one (airbench: 0.6; hiverge: 0.5566).
        optimizer: see ``OptimizerConfig``.
        schedule: see ``ScheduleConfig``.
        whitening: see ``WhiteningConfig`` (networks with a patch-whitening conv only).
        tta: see ``TTAConfig``.
        selective_backprop: see ``SelectiveBackpropConfig`` (``cifarlab.selective``); off by default.
    """

    def __init__(
        self,
        arch: str = "custom_resnet",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        logit_scale: float = 1.0,
        widths: list[int] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        activation: Literal["gelu", "silu"] | None = None,
        bn_momentum: float | None = None,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        whitening: WhiteningConfig | None = None,
        tta: TTAConfig | None = None,
        selective_backprop: SelectiveBackpropConfig | None = None,
    ):
        super().__init__()
        groups = {"optimizer": as_group(OptimizerConfig, optimizer), "schedule": as_group(ScheduleConfig, schedule),
                  "whitening": as_group(WhiteningConfig, whitening), "tta": as_group(TTAConfig, tta),
                  "selective_backprop": as_group(SelectiveBackpropConfig, selective_backprop)}
        if groups["optimizer"].name == "muon" and groups["schedule"].cycle_momentum and \
                groups["schedule"].name == "onecycle":
            raise ConfigError("cycle_momentum would overwrite muon_momentum: with --model.optimizer.name muon, "
                              "set --model.schedule.cycle_momentum false")
        if class_names is not None:
            num_classes = len(class_names)
        # Plain types only in checkpoints, so that they load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=[*GROUPS, "selective_backprop"])
        self.hparams.num_classes = num_classes
        for name, group in groups.items():
            self.hparams[name] = asdict(group)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.normalize = Normalize()
        self.net = network(arch, num_classes, widths, activation, bn_momentum, logit_scale, channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.example_input_array = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict: bool = True,
                             weights_only: bool | None = None, **overrides) -> ImageClassifier:
        """Rebuild a model from its checkpoint alone, as Lightning's does, with ``read_checkpoint_file``: tensors and
        plain data only (``weights_only`` is always true), and checkpoints written with flat arguments still load.
        ``map_location`` defaults to the CPU; ``overrides`` replace saved arguments."""
        if hparams_file is not None:
            raise TypeError("ImageClassifier.load_from_checkpoint: a checkpoint carries its own settings; "
                            "pass changed ones as keyword arguments instead of hparams_file")
        raw = read_checkpoint_file(checkpoint_path, map_location or "cpu")
        hparams, data = saved_settings(raw)
        return cls.rebuild(hparams, raw["state_dict"], data, source=checkpoint_path, strict=strict, **overrides)

    @classmethod
    def rebuild(cls, hparams: dict[str, Any], state_dict: dict[str, torch.Tensor], data: dict[str, Any] | None = None,
                *, source="checkpoint", strict: bool = True, **overrides) -> ImageClassifier:
        """The model saved as ``hparams`` + ``state_dict`` (read from ``source``), weights loaded (``strict`` as for
        ``load_state_dict``), in training mode (as Lightning's ``load_from_checkpoint``); ``overrides`` replace saved
        arguments (e.g. ``tta={"level": 0}``). ``model.datamodule_hparams`` is ``data``."""
        model = construct(cls, {**hparams, **overrides}, source)
        load_weights(model, state_dict, source, strict)
        model.datamodule_hparams = dict(data or {})  # where it was trained: the default data to evaluate it on
        return model

    # The settings groups, read from the saved hyperparameters: a checkpoint always holds what the model uses.
    @property
    def optim(self) -> OptimizerConfig:
        return OptimizerConfig(**self.hparams.optimizer)

    @property
    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(**self.hparams.schedule)

    @property
    def whitening(self) -> WhiteningConfig:
        return WhiteningConfig(**self.hparams.whitening)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: ``schedule.total_steps``, or the Trainer's length."""
        return self.schedule.total_steps or int(self.trainer.estimated_stepping_batches)

    def set_total_steps(self, total: int) -> None:
        """Make the run ``total`` optimizer steps long from here on: the LR schedule stretches or shrinks (each phase
        keeping its share) and training ends at that step; the saved hyperparameters record it."""
        self.hparams.schedule = {**self.hparams.schedule, "total_steps": int(total)}
        try:
            schedulers = self.lr_schedulers()
        except RuntimeError:  # no Trainer yet: configure_optimizers reads the length from the hyperparameters
            schedulers = None
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(sched, OneCycle):
                sched.total_steps = int(total)

    @property
    def whiten(self) -> torch.nn.Conv2d | None:
        """The network's patch-whitening conv (``net.whiten``), if it has one: what ``whitening`` configures."""
        conv = getattr(self.net, "whiten", None)
        return conv if isinstance(conv, torch.nn.Conv2d) else None

    def setup(self, stage: str) -> None:
        # Take the training data's statistics; a checkpoint restored after this overrides them with its own.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "mean", None) is not None:
            self.normalize.set_stats(dm.mean, dm.std)

    def on_fit_start(self) -> None:
        # A whitening conv starts from the training data's patch covariance (not on resume: the checkpoint's
        # weights were restored before this hook).
        dm = getattr(self.trainer, "datamodule", None)
        if self.whiten is not None and self.trainer.ckpt_path is None and dm is not None:
            x, _ = dm.train_set.batch(range(min(5000, len(dm.train_set))))  # airbench: 5,000 images
            self.net.init_whitening(self.normalize(x.to(self.device)))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.whiten is None or self.whiten.bias is None:
            return
        white = self.whitening
        span = white.bias_epochs * self.trainer.num_training_batches  # optimizer steps
        # With bias_decay the bias's LR falls linearly to 0 over `span` steps (mid-epoch for a fractional
        # bias_epochs) and the bias is frozen from then on: the same weights (SGD's momentum and decay are scaled by
        # the LR), but the backward pass skips the first conv's input gradient, the GELU's and the whitening conv's
        # (hiverge: 6 steps of bias, then 26 more of the first epoch without it). Without, it trains whole epochs.
        trains = self.global_step < span if white.bias_decay else self.current_epoch < white.bias_epochs
        self.whiten.bias.requires_grad_(trains)
        if white.bias_decay and self.current_epoch < white.bias_epochs:
            # The scheduler sets each group's LR from scratch every step, so scaling its last value cannot compound.
            opt = self.optimizers(use_pl_optimizer=False)
            found = [i for i, g in enumerate(opt.param_groups) if g.get("whiten_bias")]
            if not found:
                return
            i, sched = found[0], self.lr_schedulers()
            peak = self.optim.lr * white.bias_lr_scale
            scheduled = sched.get_last_lr()[i] if sched is not None else peak
            opt.param_groups[i]["lr"] = scheduled * max(0.0, 1 - self.global_step / span)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # A set schedule length ends the run there (Lightning's limits may be further: --budget may lengthen it).
        if self.schedule.total_steps and self.global_step >= self.schedule.total_steps:
            self.trainer.should_stop = True

    def logits_and_loss(self, batch, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, labels, cross-entropy loss)`` of a batch ``(uint8 images, labels)``; with ``tta``, the
        test-time views' logits."""
        x, y = batch
        logits = self.tta_logits(x) if tta else self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        return logits, y, loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        selective = SelectiveBackpropConfig(**self.hparams.selective_backprop)
        if len(batch) == 3:  # (images, labels, indices): the data prunes epochs by loss (cifarlab.pruning)
            if selective.keep < 1:
                raise ConfigError("--data.pruning and --model.selective_backprop each choose images by loss: "
                                  "use one of them")
            logits, y, loss = self.pruned_logits_and_loss(*batch)
        else:
            if selective.keep < 1:  # (off: nothing more runs or is logged than without the option)
                x, y = batch
                if selective.selects(self.global_step, self.total_steps):
                    # Scored in eval mode: BN's running statistics are left for the training forward to update, once.
                    with evaluating(self):
                        batch = select_by_loss(self, x, y, selective.keep, scale_factor=selective.scale_factor,
                                               label_smoothing=self.hparams.label_smoothing)
                self.log("train_kept", len(batch[1]) / len(y), on_step=True, on_epoch=True)
            logits, y, loss = self.logits_and_loss(batch)
        # train_loss and train_acc are those of the images trained on (the kept ones on a selective step)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def pruned_logits_and_loss(self, x: torch.Tensor, y: torch.Tensor,
                               index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, labels, loss)`` of a batch of a pruned epoch: each image's loss weighted as the epoch's draw
        says, and recorded as that image's score for the next draws."""
        pruning = self.trainer.datamodule.pruning
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.hparams.label_smoothing)  # (B,)
        pruning.record(index, losses)
        self.log("train_left_out", float(pruning.left_out), on_step=False, on_epoch=True, reduce_fx="max")
        return logits, y, (losses * pruning.weights_of(index).to(losses.device)).mean()

    def validation_step(self, batch, batch_idx: int) -> None:
        logits, y, loss = self.logits_and_loss(batch)
        self.val_acc(logits, y)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)  # averaged over DDP ranks (metrics sync anyway)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.test_confmat.reset()
        self.test_probs: list[torch.Tensor] = []  # (B, K) per batch, for the saved predictions

    def test_step(self, batch, batch_idx: int) -> None:
        logits, y, loss = self.logits_and_loss(batch, tta=True)
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
        ``muon``, conv filters in a group of their own at ``muon_lr``, ``muon_momentum``; a whitening bias in a group
        of its own (``whiten_bias=True``) when its LR differs from ``lr`` or decays early."""
        opt, white = self.optim, self.whitening
        bn_ids = {id(p) for m in self.modules() if isinstance(m, BATCH_NORMS)
                  for p in m.parameters()}
        # Frozen parameters (airbench's whitening weights, BN scales) are left out. The whitening bias is frozen
        # only from epoch `bias_epochs` on, so it is in: SGD skips it once it has no gradient.
        params = [p for p in self.parameters() if p.requires_grad]
        bn = [p for p in params if id(p) in bn_ids]
        other = [p for p in params if id(p) not in bn_ids]
        groups = []
        whiten_bias = self.whiten.bias if self.whiten is not None else None
        if whiten_bias is not None and (white.bias_lr_scale != 1 or white.bias_decay):
            # Only then: checkpoints of recipes without these options keep their optimizer's group layout.
            other = [p for p in other if p is not whiten_bias]
            scale = white.bias_lr_scale
            groups.append({"params": [whiten_bias], "lr": opt.lr * scale, "weight_decay": opt.weight_decay / scale,
                           "whiten_bias": True})
        if opt.name == "muon":
            filters = [p for p in other if p.ndim == 4]
            other = [p for p in other if p.ndim != 4]
            groups.append({"params": filters, "lr": opt.muon_lr, "momentum": opt.muon_momentum, "weight_decay": 0.0,
                           "muon": True, "ns_steps": opt.muon_ns_steps})
        groups.append({"params": other, "lr": opt.lr, "weight_decay": opt.weight_decay})
        if bn:
            scale = opt.bn_lr_scale
            groups.append({"params": bn, "lr": opt.lr * scale, "weight_decay": opt.weight_decay / scale})
        return groups

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``param_groups()`` (no schedule)."""
        opt = self.optim
        groups = self.param_groups()
        if opt.name == "adam":
            return torch.optim.Adam(groups)
        if opt.name == "muon":
            return Muon(groups, momentum=opt.momentum, nesterov=opt.nesterov)
        return torch.optim.SGD(groups, momentum=opt.momentum, nesterov=opt.nesterov)

    def configure_optimizers(self):
        sched = self.schedule
        opt = self.make_optimizer()
        if sched.name == "none":
            return opt
        onecycle = OneCycle(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=self.total_steps,
            pct_start=sched.pct_start, anneal_strategy=sched.anneal_strategy, div_factor=sched.div_factor,
            final_div_factor=sched.final_div_factor, three_phase=sched.three_phase,
            cycle_momentum=sched.cycle_momentum)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": onecycle, "interval": "step"}}
