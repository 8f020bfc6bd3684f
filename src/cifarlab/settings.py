"""A model's settings and how a checkpoint is read back, without Lightning: the settings groups (each a dataclass
whose fields are the command-line flags: ``--model.optimizer.lr``, ``--model.schedule.pct_start``,
``--model.tta.level``), settings from older versions (``LEGACY_NAMES``, ``migrate_hparams``) and the safe file read.
The training module and every evaluating command (app, predict, report, export) share them.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from cifarlab.errors import CifarlabError, ConfigError


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


def as_group(cls: type, value: Any):
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
