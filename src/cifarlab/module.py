"""The LightningModule: preprocessing + network, loss, metrics, optimizer and OneCycle schedule.

Its settings come in groups, each a dataclass whose fields are the command-line flags
(``--model.optimizer.lr``, ``--model.schedule.pct_start``, ``--model.tta.level``), as ``AugmentConfig`` is for the data.
The module also owns how its checkpoints are read back: the safe file read, settings from older versions
(``LEGACY_NAMES``, ``migrate_hparams``) and the rebuild (``cifarlab.checkpoint`` builds on these).
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.models import build_model
from cifarlab.optim import Muon, OneCycle
from cifarlab.transforms import IMAGE_SIZE, Normalize


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its per-group learning rates."""

    name: Literal["adam", "sgd", "muon"] = "adam"
    """``adam`` (the seed), ``sgd`` (Nesterov momentum), or ``muon``: conv filters trained with Muon
    (``cifarlab.optim.Muon``), every other parameter with SGD as for ``sgd``."""
    lr: float = 0.01
    """Peak learning rate of the schedule (``cifarlab lr-find`` suggests one); with ``muon``, of the non-filter
    parameters."""
    weight_decay: float = 1e-4
    """L2 coefficient applied by the optimizer to every parameter."""
    momentum: float = 0.9
    """SGD momentum (ignored by Adam, whose beta1 OneCycle may cycle instead)."""
    nesterov: bool = True
    """Nesterov momentum for SGD."""
    bn_lr_scale: float = 1.0
    """LR multiplier for BatchNorm parameters; their weight decay is divided by it, so that LR x decay stays the
    same (airbench: 64, with frozen BN scales, i.e. for the BN biases)."""
    muon_lr: float = 0.24
    """Peak learning rate of the Muon-trained filters (their update is orthogonalised, so this is a step size
    relative to the normalised weights, independent of the loss scale; airbench: 0.24)."""
    muon_momentum: float = 0.6
    """Momentum of the Muon-trained filters (airbench: 0.6)."""
    muon_ns_steps: int = 3
    """Newton-Schulz iterations per Muon update (airbench: 3)."""

    def for_batch(self, batch_size: int, recipe_batch: int) -> tuple[OptimizerConfig, str]:
        """These settings for a batch of ``batch_size`` instead of the ``recipe_batch`` they were given for, and
        what changed, in words. SGD (``sgd``, and ``muon``'s non-filter groups): ``lr`` in proportion to the batch,
        as the recipes derive it (a per-example LR of a summed loss x batch for the mean loss), so the per-example
        step stays the same; ``weight_decay``, ``bn_lr_scale`` are relative to ``lr`` (decay per step = lr x
        weight_decay, which then scales with the batch too, as in the recipes) and stay. Muon's ``muon_lr`` stays
        (its update is orthogonalised: its size does not depend on the gradient's). Adam: ``lr`` x the square root of
        the ratio (the square-root rule for adaptive optimizers, Malladi et al. 2022)."""
        ratio = batch_size / recipe_batch
        if self.name == "adam":
            return replace(self, lr=self.lr * ratio**0.5), f"learning rate scaled by sqrt({batch_size}/{recipe_batch})"
        kept = "; Muon's kept" if self.name == "muon" else ""
        return replace(self, lr=self.lr * ratio), f"learning rates scaled by {batch_size}/{recipe_batch}{kept}"


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule (``cifarlab.optim.OneCycle``, torch's ``OneCycleLR``, stepped every batch)."""

    name: Literal["onecycle", "none"] = "onecycle"
    """``onecycle``, or ``none`` (constant ``optimizer.lr``)."""
    pct_start: float = 5 / 24
    """Fraction of all steps spent warming up to the peak LR."""
    div_factor: float = 100.0
    """The schedule starts at peak / ``div_factor``."""
    final_div_factor: float = 100.0
    """It ends at peak / ``div_factor`` / ``final_div_factor``."""
    three_phase: bool = False
    """OneCycle's third (annihilation) phase."""
    anneal_strategy: Literal["linear", "cos"] = "linear"
    """Shape of the ramps."""
    cycle_momentum: bool = True
    """Cycle momentum (SGD) or beta1 (Adam) inversely to the LR, between 0.85 and 0.95."""
    total_steps: int | None = None
    """Optimizer steps of the schedule; training ends there even if the Trainer's limits are further. None: the
    Trainer's length (``max_steps``, or ``max_epochs`` x batches). ``--budget`` sets it to the planned steps."""

    def check(self) -> None:
        """A ``ConfigError`` for a value out of range."""
        if self.total_steps is not None and self.total_steps < 1:
            raise ConfigError(f"schedule.total_steps is a number of optimizer steps (>= 1, or null for the "
                              f"Trainer's length), got {self.total_steps}")


@dataclass(frozen=True)
class WhiteningConfig:
    """The patch-whitening conv's bias (networks with one: ``airbench``); its weights stay frozen."""

    bias_epochs: float = 3
    """Epochs during which the bias trains; frozen after (airbench: 3; hiverge: 0.19, with ``bias_decay``). A
    fraction ends its learning rate mid-epoch (with ``bias_decay``), and the bias is frozen from that step on."""
    bias_lr_scale: float = 1.0
    """LR multiplier for the bias, its weight decay divided by it as for ``bn_lr_scale`` (airbench94: 1, with the
    head; airbench94_muon: 64, with the BN biases)."""
    bias_decay: bool = False
    """The bias's LR falls linearly from its scheduled value to 0 at the end of epoch ``bias_epochs`` instead of
    stopping there abruptly (airbench94_muon)."""


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation, used by ``cifarlab test``, the app, ``predict`` and ``report`` alike."""

    level: Literal[0, 1, 2] = 0
    """0 none, 1 + mirror (2 passes), 2 + mirror of 1-px translations (6 passes)."""
    confident_at: float = 1.0
    """Selective TTA (hiverge's CIFAR-10 speedrun): an image whose plain prediction's top probability is at least
    this keeps that prediction, and only the others get the extra views. Decided per image, so a prediction never
    depends on the rest of its batch. 1.0: every image gets them."""

    def check(self) -> None:
        """A ``ConfigError`` for a value out of range (the CLI's parser checks types only)."""
        if not 0 < self.confident_at <= 1:
            raise ConfigError(f"tta.confident_at is a probability in (0, 1] (1: TTA for every image), "
                              f"got {self.confident_at}")


BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)

GROUPS: dict[str, type] = {"optimizer": OptimizerConfig, "schedule": ScheduleConfig, "whitening": WhiteningConfig,
                           "tta": TTAConfig}
# Checkpoints written before the groups (until 2026-11-28) carry flat arguments: old name -> (group, field).
LEGACY_NAMES: dict[str, tuple[str, str]] = {
    **{name: ("optimizer", name) for name in ("lr", "weight_decay", "momentum", "nesterov", "bn_lr_scale", "muon_lr",
                                              "muon_momentum", "muon_ns_steps")},
    **{name: ("schedule", name) for name in ("pct_start", "div_factor", "final_div_factor", "three_phase",
                                             "anneal_strategy", "cycle_momentum")},
    "optimizer": ("optimizer", "name"), "scheduler": ("schedule", "name"), "tta_level": ("tta", "level"),
    "whiten_bias_epochs": ("whitening", "bias_epochs"), "whiten_bias_lr_scale": ("whitening", "bias_lr_scale"),
    "whiten_bias_decay": ("whitening", "bias_decay"),
}


# Model arguments added since the first checkpoints, with the value that means "as before" (the network's default).
# A checkpoint without one gets it here, so that a recipe's newer value (fast.yaml's SiLU) never lands on weights
# that were trained without it: LightningCLI lays a checkpoint's settings over the recipe's only where it has them.
ADDED_ARGUMENTS: dict[str, Any] = {"activation": None, "bn_momentum": None}


def migrate_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters in today's grouped form: flat ones (``lr``, ``scheduler``, ``tta_level``,
    ``whiten_bias_epochs``, ...) moved into their groups, over any grouped values; arguments and group fields added
    since (``activation``, ``tta.confident_at``, ...) filled in with their defaults, which keep the old behaviour.
    The input is not modified."""
    moved: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if key in LEGACY_NAMES and not (key == "optimizer" and isinstance(value, dict)):
            group, field = LEGACY_NAMES[key]
            moved.setdefault(group, {})[field] = value
        else:
            out[key] = value
    for group, values in moved.items():
        out[group] = {**(out.get(group) or {}), **values}
    if "arch" in out:  # an ImageClassifier's settings
        for name, default in ADDED_ARGUMENTS.items():
            out.setdefault(name, default)
        for name, cls in GROUPS.items():
            if out.get(name) is None or isinstance(out[name], dict):
                out[name] = {**asdict(cls()), **(out.get(name) or {})}
    return out


def read_checkpoint_file(path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A ``.ckpt`` written by ``cifarlab fit`` as a dict, loaded without unpickling arbitrary objects.

    ``torch.load(weights_only=True)`` only accepts tensors and plain containers, so a crafted checkpoint carrying a
    pickle payload is refused (a ``CifarlabError``) before any of its code can run.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CifarlabError(f"checkpoint {path} not found: pass the .ckpt of a run, e.g. "
                            "--ckpt runs/seed/version_0/checkpoints/last.ckpt")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # no code reference refused: bytes of something else
            raise CifarlabError(f"{path} is not a readable PyTorch checkpoint (UnpicklingError): "
                                "pass a .ckpt file written by `cifarlab fit`") from None
        # torch names the refused global in its message ("Unsupported global: GLOBAL exec ..."): show that line.
        first = next(ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln)
        raise CifarlabError(f"refusing to load {path}: it holds pickled objects, not only weights and plain "
                            f"data ({first[:160]}); load checkpoints written by cifarlab only") from None
    except Exception as err:  # torch.load raises anything from KeyError to RuntimeError on a non-checkpoint
        raise CifarlabError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}): "
                            "pass a .ckpt file written by `cifarlab fit`") from None
    if not isinstance(raw, dict) or "state_dict" not in raw or "hyper_parameters" not in raw:
        raise CifarlabError(f"{path} is not a cifarlab checkpoint (no state_dict/hyper_parameters): "
                            "pass a .ckpt file written by `cifarlab fit`")
    return raw


def saved_settings(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's arguments (today's grouped form, ``migrate_hparams``) and the data module's arguments of a
    checkpoint read by ``read_checkpoint_file``, without Lightning's bookkeeping (keys with a leading underscore)."""
    hparams = migrate_hparams({k: v for k, v in raw["hyper_parameters"].items() if not k.startswith("_")})
    data = {k: v for k, v in raw.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}
    return hparams, data


def _as(cls: type, value: Any):
    """A group's dataclass from itself, a dict (a checkpoint, a YAML file) or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}: it takes {sorted(known)}")
        value = cls(**value)
    for name, hint in get_type_hints(cls).items():  # a checkpoint or a program is not checked by the CLI's parser
        if get_origin(hint) is Literal and getattr(value, name) not in get_args(hint):
            raise ConfigError(f"{cls.__name__}.{name} = {getattr(value, name)!r}: choose one of {list(get_args(hint))}")
    if hasattr(value, "check"):
        value.check()
    return value


class ImageClassifier(L.LightningModule):
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
    ):
        super().__init__()
        groups = {"optimizer": _as(OptimizerConfig, optimizer), "schedule": _as(ScheduleConfig, schedule),
                  "whitening": _as(WhiteningConfig, whitening), "tta": _as(TTAConfig, tta)}
        if groups["optimizer"].name == "muon" and groups["schedule"].cycle_momentum and \
                groups["schedule"].name == "onecycle":
            raise ConfigError("cycle_momentum would overwrite muon_momentum: with --model.optimizer.name muon, "
                              "set --model.schedule.cycle_momentum false")
        if class_names is not None:
            num_classes = len(class_names)
        # Plain types only in checkpoints, so that they load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=list(GROUPS))
        self.hparams.num_classes = num_classes
        for name, group in groups.items():
            self.hparams[name] = asdict(group)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.normalize = Normalize()
        self.net = build_model(arch, num_classes, widths=widths, activation=activation, bn_momentum=bn_momentum,
                               logit_scale=logit_scale)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
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
        try:
            model = cls(**{**hparams, **overrides})
        except ConfigError:
            raise  # a setting that is wrong today says so itself
        except (TypeError, ValueError) as err:
            raise CifarlabError(f"{source} was written for another model ({err}): it cannot be rebuilt by this "
                                "cifarlab version") from None
        try:
            model.load_state_dict(state_dict, strict=strict)
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[0]
            raise CifarlabError(f"the weights in {source} do not fit its own model ({detail[:160]})") from None
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
    def tta(self) -> TTAConfig:
        return TTAConfig(**self.hparams.tta)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        x = self.normalize(x)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def tta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over test-time views of uint8 images ``x`` (``tta.level``); with ``tta.confident_at`` < 1,
        images already predicted with that confidence keep their plain logits."""
        tta = self.tta
        plain = self(x)
        if tta.level == 0 or tta.confident_at >= 1:
            return self._views(x, plain, tta.level)
        unsure = plain.float().softmax(1).amax(1) < tta.confident_at  # (B,) bool
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            # An exported graph cannot size a batch by the data: every image gets the views, the mask picks.
            return torch.where(unsure[:, None], self._views(x, plain, tta.level), plain)
        idx = unsure.nonzero().squeeze(1)
        if len(idx) == 0:
            return plain
        out = plain.clone()
        out[idx] = self._views(x[idx], plain[idx], tta.level).to(out.dtype)
        return out

    def _views(self, x: torch.Tensor, plain: torch.Tensor, level: int) -> torch.Tensor:
        """``tta_logits`` of every image of ``x``, given its plain logits ``plain``."""
        if level == 0:
            return plain
        mirror = 0.5 * (plain + self(x.flip(-1)))
        if level == 1:
            return mirror
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]  # one pixel up-left and down-right
        translated = torch.stack([0.5 * (self(v) + self(v.flip(-1))) for v in shifted]).mean(0)
        return 0.5 * mirror + 0.5 * translated

    def logits_and_loss(self, batch, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, labels, cross-entropy loss)`` of a batch ``(uint8 images, labels)``; with ``tta``, the
        test-time views' logits."""
        x, y = batch
        logits = self.tta_logits(x) if tta else self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        return logits, y, loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        logits, y, loss = self.logits_and_loss(batch)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

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
