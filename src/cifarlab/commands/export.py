"""``cifarlab export``: a checkpoint as an ONNX model for onnxruntime (uint8 images in, probabilities out)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cifarlab.checkpoint import load_classifier
from cifarlab.commands.parsing import command_parser, parse
from cifarlab.export import export_onnx


def export(ckpt: str, format: Literal["onnx"] = "onnx", out: str | None = None, tta: bool = False,
           opset: int = 18) -> Path:
    """Export a checkpoint for deployment (preprocessing inside the graph).

    Args:
        ckpt: A checkpoint written by `cifarlab fit`.
        format: Only ONNX for now.
        out: Output file (default: beside the checkpoint, .onnx).
        tta: Include the recipe's test-time augmentation (it multiplies the cost per image).
        opset: ONNX opset version.
    """
    model = load_classifier(ckpt)
    path = export_onnx(model, Path(out) if out else Path(ckpt).with_suffix(".onnx"), tta=tta, opset=opset)
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MB): input 'images' (N, 3, 32, 32) uint8 RGB, "
          f"output 'probs' (N, {len(model.class_names)}) over {', '.join(model.class_names)}")
    return path


def main(argv: list[str]) -> None:
    parser = command_parser(export, "cifarlab export", skip={"tta"})
    # A switch: a bare --tta means true (--tta false too).
    parser.add_argument("--tta", type=bool, nargs="?", const=True, default=False,
                        help="Include the recipe's test-time augmentation (it multiplies the cost per image).")
    export(**parse(parser, argv))
