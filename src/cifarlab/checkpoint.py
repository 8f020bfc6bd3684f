"""One checkpoint: read safely, checked against the model a command builds, rebuilt into a model, and the data
settings it was trained with. Used by ``fit``/``validate``/``test --ckpt_path``, the app, report, predict, export
and audit alike."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifarlab.errors import CifarlabError, ConfigError


@dataclass(frozen=True)
class Checkpoint:
    """A ``.ckpt`` written by ``cifarlab fit``, as plain data.

    Attributes:
        path: the file.
        hparams: the model's arguments in today's grouped form (``module.migrate_hparams``), without Lightning's
            bookkeeping (keys with a leading underscore).
        state_dict: the weights and buffers (dataset statistics included).
        data: the data module's arguments it was trained with (``root``, ``source``, ``val_size``, ...).
    """

    path: Path
    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    data: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Load a checkpoint without unpickling arbitrary objects.

        ``torch.load(weights_only=True)`` only accepts tensors and plain containers, so a crafted checkpoint
        carrying a pickle payload is refused (a ``CifarlabError``) before any of its code can run.
        """
        from cifarlab.module import migrate_hparams

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
        hparams = migrate_hparams({k: v for k, v in raw["hyper_parameters"].items() if not k.startswith("_")})
        data = {k: v for k, v in raw.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}
        return cls(path, hparams, raw["state_dict"], data)

    def describe(self) -> str:
        """``arch=airbench, 10 classes``: the network it holds."""
        return describe_model(self.hparams)

    def check_arch(self, arch: str | None) -> None:
        """One-line error unless it holds an ``arch`` network (what ``fit --ckpt_path`` continues)."""
        if self.hparams.get("arch") != arch:
            raise CifarlabError(f"checkpoint {self.path} holds another network ({self.describe()}); this run builds "
                                f"arch={arch}: pass the recipe it was trained with, or train anew without --ckpt_path")

    def check_fits(self, model: torch.nn.Module) -> None:
        """One-line error unless its weights have exactly the names and shapes of ``model``'s."""
        own, theirs = model.state_dict(), self.state_dict
        bad = sorted(set(own) ^ set(theirs)) or [k for k in own if tuple(own[k].shape) != tuple(theirs[k].shape)]
        if bad:
            built = describe_model(dict(getattr(model, "hparams", {})))
            raise CifarlabError(f"checkpoint {self.path} holds another network ({self.describe()}; this run builds "
                                f"{built}; first mismatch: {bad[0]}): pass the recipe it was trained with, or train "
                                "anew without --ckpt_path")

    def build(self, strict: bool = True, **overrides: Any):
        """The ``ImageClassifier`` it holds, weights loaded (``strict`` as for ``load_state_dict``), in training mode
        (as Lightning's ``load_from_checkpoint``); ``overrides`` replace saved arguments (e.g. ``tta={"level": 0}``).
        ``model.datamodule_hparams`` is ``data``."""
        from cifarlab.module import ImageClassifier

        try:
            model = ImageClassifier(**{**self.hparams, **overrides})
        except ConfigError:
            raise  # a setting that is wrong today says so itself
        except (TypeError, ValueError) as err:
            raise CifarlabError(f"{self.path} was written for another model ({err}): it cannot be rebuilt by this "
                                "cifarlab version") from None
        try:
            model.load_state_dict(self.state_dict, strict=strict)
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[0]
            raise CifarlabError(f"the weights in {self.path} do not fit its own model ({detail[:160]})") from None
        model.datamodule_hparams = dict(self.data)  # where it was trained: the default data to evaluate it on
        return model


def describe_model(hparams: dict) -> str:
    """``arch=airbench, 10 classes``: what a checkpoint or a configuration builds."""
    names = hparams.get("class_names")
    return f"arch={hparams.get('arch')}, {len(names) if names else hparams.get('num_classes')} classes"


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu"):
    """An ``ImageClassifier`` rebuilt from a checkpoint alone, in eval mode (see ``Checkpoint.read``: no pickles)."""
    return Checkpoint.read(path, map_location).build().eval()
