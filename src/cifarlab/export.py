"""Export a trained checkpoint for deployment without PyTorch: ONNX, run by onnxruntime or any ONNX runtime.

The exported graph holds the whole model path cifarlab uses, normalisation included, so a server only has to
turn an image into the input below (``cifarlab.inference.model_input`` is the reference; in words: decode, convert
to RGB, resize to 32x32 with PIL's bicubic filter and antialiasing, keep uint8, channels first):

* input  ``images``: ``(N, 3, 32, 32)`` uint8 RGB, any batch size N;
* output ``probs``:  ``(N, K)`` float32 class probabilities (softmax), classes in the order of the
  ``class_names`` metadata entry (also stored: ``preprocessing``, ``arch``, ``mean``, ``std``, ``tta_level``).

Test-time augmentation is exported only when asked (``--tta``): it multiplies the cost per image.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from cifarlab.errors import needs_extra
from cifarlab.files import atomic_path

PREPROCESSING = ("uint8 RGB, channels first (N, 3, 32, 32); resize any image to 32x32 with PIL bicubic "
                 "(antialiased), no other scaling: normalisation by the training mean/std is inside the graph")


class Probabilities(nn.Module):
    """uint8 images ``(N, 3, 32, 32)`` -> float32 probabilities ``(N, K)``, with or without the model's TTA."""

    def __init__(self, model: nn.Module, tta: bool = False):
        super().__init__()
        self.model = model
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model.tta_logits(images) if self.tta else self.model(images)
        return logits.float().softmax(1)


def export_onnx(model, out: str | Path, tta: bool = False, opset: int = 18) -> Path:
    """Write ``model`` (an ``ImageClassifier``) as ONNX to ``out`` with a dynamic batch size; returns the path."""
    out = Path(out)
    with needs_extra("export"):
        import onnx  # noqa: F401  (an optional extra; torch.onnx needs it, and onnxscript for the dynamo exporter)
    wrapper = Probabilities(model.float().eval(), tta).eval()
    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.no_grad(), atomic_path(out) as tmp:  # never a half-written model
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecation chatter
        program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                    output_names=["probs"], dynamic_shapes={"images": {0: batch}},
                                    external_data=False, verbose=False)
        program.model.metadata_props.update(_metadata(model, tta))
        program.save(tmp, external_data=False)
    return out


def _metadata(model, tta: bool) -> dict[str, str]:
    hp = model.hparams
    return {"class_names": json.dumps(list(model.class_names)), "preprocessing": PREPROCESSING,
            "arch": str(hp.get("arch")), "tta_level": str(model.tta.level if tta else 0),
            "mean": json.dumps([round(float(v), 6) for v in model.normalize.mean]),
            "std": json.dumps([round(float(v), 6) for v in model.normalize.std]), "producer": "cifarlab"}
