"""The model a checkpoint holds, as a plain ``nn.Module``: uint8 images in, logits out (normalisation, network and
test-time augmentation). ``ImageClassifier`` trains one; the app, ``predict``, ``report`` and ``export`` rebuild one
with ``Classifier.rebuild``, without importing Lightning (seconds of start-up on a 2-core machine: docs/results.md).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import CifarlabError, ConfigError
from cifarlab.models import build_model
from cifarlab.settings import GROUPS, TTAConfig, as_group
from cifarlab.transforms import Normalize


def network(arch: str, num_classes: int, widths: list[int] | None, activation: str | None,
            bn_momentum: float | None, logit_scale: float, channels_last: bool) -> nn.Module:
    """The network of a model's settings, in the memory format it runs in."""
    net = build_model(arch, num_classes, widths=widths, activation=activation, bn_momentum=bn_momentum,
                      logit_scale=logit_scale)
    return net.to(memory_format=torch.channels_last) if channels_last else net


class Predicts:
    """Prediction on top of ``normalize``, ``net`` and the saved settings ``hparams`` (a mixin: the same code serves
    the plain ``Classifier`` and the LightningModule)."""

    hparams: Any
    normalize: Normalize
    net: nn.Module

    @property
    def tta(self) -> TTAConfig:
        return TTAConfig(**self.hparams["tta"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        x = self.normalize(x)
        if self.hparams["channels_last"]:
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


def construct(cls: type, settings: dict[str, Any], source) -> Any:
    """``cls(**settings)``; settings this version cannot build are one line naming ``source``."""
    try:
        return cls(**settings)
    except ConfigError:
        raise  # a setting that is wrong today says so itself
    except (TypeError, ValueError) as err:
        raise CifarlabError(f"{source} was written for another model ({err}): it cannot be rebuilt by this "
                            "cifarlab version") from None


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source, strict: bool = True) -> None:
    """``model.load_state_dict``; weights that do not fit are one line naming ``source``."""
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0]
        raise CifarlabError(f"the weights in {source} do not fit its own model ({detail[:160]})") from None


class Classifier(Predicts, nn.Module):
    """A trained model for evaluation: ``ImageClassifier``'s network, normalisation and TTA, with the same weight
    names, and its settings in ``hparams`` (training settings are kept there, unused).

    Args:
        arch, num_classes, class_names, logit_scale, widths, channels_last, activation, bn_momentum: as
            ``ImageClassifier``'s.
        tta: ``TTAConfig``'s fields.
        training: the training settings (optimizer, schedule, ...), recorded only.
    """

    def __init__(self, arch: str = "custom_resnet", num_classes: int = 10, class_names: list[str] | None = None,
                 logit_scale: float = 1.0, widths: list[int] | None = None, channels_last: bool = True,
                 activation: str | None = None, bn_momentum: float | None = None,
                 tta: dict[str, Any] | None = None, **training: Any):
        super().__init__()
        if class_names:
            num_classes = len(class_names)
        tta_config = as_group(TTAConfig, tta)
        for name, group in training.items():  # unused here, but a checkpoint this version cannot train says so
            if name in GROUPS:
                as_group(GROUPS[name], group)
        self.hparams = {**training, "arch": arch, "num_classes": num_classes, "class_names": class_names,
                        "logit_scale": logit_scale, "widths": widths, "channels_last": channels_last,
                        "activation": activation, "bn_momentum": bn_momentum, "tta": asdict(tta_config)}
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.normalize = Normalize()
        self.net = network(arch, num_classes, widths, activation, bn_momentum, logit_scale, channels_last)
        self.datamodule_hparams: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def rebuild(cls, hparams: dict[str, Any], state_dict: dict[str, torch.Tensor], data: dict[str, Any] | None = None,
                *, source="checkpoint", strict: bool = True, **overrides) -> Classifier:
        """The model saved as ``hparams`` + ``state_dict`` (read from ``source``), weights loaded, in eval mode;
        ``overrides`` replace saved settings (e.g. ``tta={"level": 0}``). ``model.datamodule_hparams`` is ``data``:
        where it was trained, the default data to evaluate it on."""
        model = construct(cls, {**hparams, **overrides}, source)
        load_weights(model, state_dict, source, strict)
        model.datamodule_hparams = dict(data or {})
        return model.eval()
