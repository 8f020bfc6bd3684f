"""``cifarlab predict``: the top-k classes of image files, folders and globs, one JSON line per image as it is done
(exit status 1 when an image could not be classified)."""

from __future__ import annotations

import json

import torch
from jsonargparse.typing import PositiveInt

from cifarlab.checkpoint import load_classifier
from cifarlab.commands.parsing import command_parser, parse
from cifarlab.errors import CifarlabError
from cifarlab.inference import expand_images, predict_images


def predict(images: list[str], ckpt: str, top_k: PositiveInt = 3, batch_size: PositiveInt = 64,
            device: str = "auto") -> int:
    """Classify images (JSON lines, with the recipe's test-time augmentation).

    Args:
        images: Image files, folders (searched recursively) or globs ('*.jpg').
        ckpt: A checkpoint written by `cifarlab fit`.
        top_k: Classes per image, most probable first.
        batch_size: Images per forward pass.
        device: auto (a GPU if there is one), cpu, cuda, cuda:1, mps ...

    Returns the number of images that failed (missing, unreadable).
    """
    if not images:
        raise CifarlabError("cifarlab predict needs images: files, folders or globs, e.g. cifarlab predict photo.jpg "
                            "--ckpt PATH")
    model = load_classifier(ckpt)
    try:
        model.to(torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device))
    except (RuntimeError, AssertionError, ValueError) as err:  # an unknown name, or no such device here
        raise CifarlabError(f"--device {device}: {str(err).strip().splitlines()[0]}") from None
    paths, missing = expand_images(images)
    for pattern in missing:
        print(json.dumps({"image": pattern, "error": "no such file, or no image in that folder or glob"}), flush=True)
    failed = len(missing)
    for record in predict_images(model, paths, top_k, batch_size):
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return failed


def main(argv: list[str]) -> None:
    parser = command_parser(predict, "cifarlab predict", skip={"images"})
    parser.add_argument("images", nargs="*", help="Image files, folders (searched recursively) or globs ('*.jpg').")
    if predict(**parse(parser, argv)):
        raise SystemExit(1)
