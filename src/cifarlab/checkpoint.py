"""One checkpoint: read safely, checked against the model a command builds, rebuilt into the plain ``Classifier``,
and the data settings it was trained with. Used by ``fit``/``validate``/``test --ckpt_path``, the app, report,
predict, export and audit alike; none of it imports Lightning (``cifarlab.settings`` owns the file read and older
settings).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifarlab.classifier import Classifier
from cifarlab.errors import CifarlabError
from cifarlab.settings import read_checkpoint_file, saved_settings


@dataclass(frozen=True)
class Checkpoint:
    """A ``.ckpt`` written by ``cifarlab fit``, as plain data.

    Attributes:
        path: the file.
        hparams: the model's arguments in today's grouped form (``settings.migrate_hparams``), without Lightning's
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
        """Load a checkpoint without unpickling arbitrary objects (``settings.read_checkpoint_file``: a pickle
        payload or a file that is not a cifarlab checkpoint is a one-line ``CifarlabError``)."""
        path = Path(path).expanduser()
        raw = read_checkpoint_file(path, map_location)
        hparams, data = saved_settings(raw)
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

    def build(self, strict: bool = True, **overrides: Any) -> Classifier:
        """The ``Classifier`` it holds, weights loaded (``strict`` as for ``load_state_dict``), in eval mode;
        ``overrides`` replace saved arguments (e.g. ``tta={"level": 0}``). ``model.datamodule_hparams`` is
        ``data``."""
        return Classifier.rebuild(self.hparams, self.state_dict, self.data, source=self.path, strict=strict,
                                  **overrides)


def describe_model(hparams: dict) -> str:
    """``arch=airbench, 10 classes``: what a checkpoint or a configuration builds."""
    names = hparams.get("class_names")
    return f"arch={hparams.get('arch')}, {len(names) if names else hparams.get('num_classes')} classes"


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """The ``Classifier`` rebuilt from a checkpoint alone, in eval mode (see ``Checkpoint.read``: no pickles)."""
    return Checkpoint.read(path, map_location).build()


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of a model's weights and buffers (names, dtypes, shapes and bytes): equal for two checkpoint
    files holding the same weights (``best.ckpt`` and ``last.ckpt`` of a run tested on its final weights)."""
    h = hashlib.sha1()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
