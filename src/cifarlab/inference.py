"""Inference outside training: the data to evaluate on, decoding any user image, cached test-set predictions.

Shared by ``cifarlab predict``, ``cifarlab report`` and the app, so they all see exactly what the model saw
in training: images become ``(3, 32, 32)`` uint8 through ``transforms.pil_to_uint8`` and the model normalises.
"""

from __future__ import annotations

import glob
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cifarlab.checkpoint import weights_digest
from cifarlab.datasets import IMG_EXTENSIONS, DataSource
from cifarlab.errors import CifarlabError, DataError
from cifarlab.files import file_key, save_predictions
from cifarlab.metrics import confusion_matrix
from cifarlab.progress import Report, steps
from cifarlab.runs import Run
from cifarlab.transforms import pil_to_uint8

MAX_IMAGE_PIXELS = 40_000_000  # refuse larger images before decoding (a 12 MP phone photo is 12.2 M pixels)
MAX_IMAGE_BYTES = 25 * 1024 * 1024  # the app's upload cap, bytes
DECODE_MIN_SIZE = 64  # pixels: JPEGs decode at reduced scale down to this side (the model needs 32)


class ImageError(CifarlabError):
    """An input image that cannot be classified (not an image, truncated, too large, ...)."""


# ---------------------------------------------------------------------------------------------- data
def eval_data(model, root: str | None = None, source: str = "auto", required: bool = True) -> DataSource | None:
    """The data a checkpoint is evaluated on, its test split loaded: ``root`` if given, else the data it was trained
    on. Returns ``None`` when no root was given and the training data is not at hand (``required=False``).
    """
    trained = getattr(model, "datamodule_hparams", {}) or {}
    if root is None:
        root, source = trained.get("root"), trained.get("source", "auto")
    data = DataSource(root, source, cache_dir=trained.get("cache_dir"))
    try:
        classes = data.class_names
        data.test_set  # noqa: B018  (loaded now: a missing or unreadable split is an error here, not in a tab)
    except DataError:
        if required:
            raise
        return None
    if classes != list(model.class_names):
        raise DataError(f"the data's classes {classes} differ from the checkpoint's {model.class_names}: "
                        "pass the --data.root the model was trained on")
    return data


# ---------------------------------------------------------------------------------------------- images
def decode_upload(data: bytes | str | Path, max_pixels: int = MAX_IMAGE_PIXELS,
                  min_size: int | None = None) -> np.ndarray:
    """Any common image (file path or bytes) -> ``(H, W, 3)`` uint8 RGB, upright.

    With ``min_size``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale while both sides stay >= ``min_size``
    (libjpeg's DCT scaling): a 12 MP photo meant for a 32x32 model decodes several times faster.

    Refuses non-images, truncated files and images above ``max_pixels`` (checked from the header, before
    decoding, so a decompression bomb never expands). Handles 16-bit, float, CMYK, palette, grayscale and
    transparent images (composited on white), EXIF rotation, and animations (first frame).
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.stat().st_size == 0:
            raise ImageError("the file is empty: upload a JPEG, PNG, WebP, GIF, BMP or TIFF image")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"the file is {path.stat().st_size / 2**20:.0f} MB, above the "
                             f"{MAX_IMAGE_BYTES // 2**20} MB limit: upload a smaller image")
        data = path.read_bytes()
    if not data:
        raise ImageError("the file is empty: upload a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # PIL's own guard, at twice its MAX_IMAGE_PIXELS
        raise ImageError(f"the image has far more pixels than the {max_pixels / 1e6:.0f} M limit allows "
                         f"(above the {max_pixels / 1e6:.0f} M limit): upload a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError("this file is not an image cifarlab can read: upload a JPEG, PNG, WebP, GIF, BMP "
                         "or TIFF image") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height / 1e6:.0f} M pixels, above the "
                         f"{max_pixels / 1e6:.0f} M limit: upload a smaller image")
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    try:
        img.seek(0)  # animations: the first frame
        if min_size and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return np.asarray(_to_rgb(img), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"the image is damaged or truncated ({str(err)[:80]}): upload the full file") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale: rescale, don't clip
        x = np.asarray(img, dtype=np.float64)
        lo, hi = float(x.min()), float(x.max())
        x = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo) * 255
        img = Image.fromarray(x.round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def model_input(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 at any size -> the ``(1, 3, 32, 32)`` uint8 batch the model sees."""
    small = pil_to_uint8(Image.fromarray(image))
    return torch.from_numpy(small.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()


@torch.no_grad()
def classify(model, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K)`` for uint8 images ``(B, 3, 32, 32)``, in eval mode, with the recipe's test-time
    augmentation: the answer ``cifarlab fit``'s test gave (``test_predictions.npz``), in predict, the app and the
    report alike."""
    return model.eval().tta_logits(x.to(model.device)).float().softmax(1).cpu()


def expand_images(patterns: list[str]) -> tuple[list[str], list[str]]:
    """Image paths from files, folders (recursively, image extensions only) and globs, in the order given (sorted
    within a folder or glob); and the arguments that matched nothing."""

    found, missing = [], []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            hits = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.exists():
            hits = [str(path)]  # a file is tried whatever its name: a bad one gets its own error line
        elif glob.has_magic(pattern):
            hits = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            hits = []
        if hits:
            found += hits
        else:
            missing.append(pattern)
    return found, missing



def predict_images(model, paths: list[str], top_k: int = 3, batch_size: int = 64) -> Iterator[dict]:
    """Top-k classes of image files, ``batch_size`` per forward pass with the recipe's TTA, in the order given:
    ``{"image": path, "top_k": [{"class": name, "prob": p}, ...]}``, or ``{"image": path, "error": why}`` for a file
    that cannot be read. Yields each batch's records as soon as it is done."""
    k = min(top_k, len(model.class_names))

    def done(pending: list[tuple[str, torch.Tensor | str]]) -> Iterator[dict]:
        decoded = [x for _, x in pending if isinstance(x, torch.Tensor)]
        top = torch.topk(classify(model, torch.cat(decoded)), k) if decoded else None
        row = 0
        for path, x in pending:
            if isinstance(x, str):
                yield {"image": path, "error": x}
                continue
            values, indices = top.values[row].tolist(), top.indices[row].tolist()
            row += 1
            yield {"image": path, "top_k": [{"class": model.class_names[i], "prob": round(float(p), 5)}
                                            for p, i in zip(values, indices)]}

    pending: list[tuple[str, torch.Tensor | str]] = []
    decoded = 0
    for path in paths:
        try:
            pending.append((path, model_input(decode_upload(path, min_size=DECODE_MIN_SIZE))))
            decoded += 1
        except (ImageError, OSError) as err:
            pending.append((path, str(err)))
        if decoded == batch_size:
            yield from done(pending)
            pending, decoded = [], 0
    if pending:
        yield from done(pending)


# ---------------------------------------------------------------------------------------------- test set
@dataclass
class Predictions:
    """The test set with a checkpoint's predictions: ``images`` (N, 32, 32, 3) uint8, ``probs`` (N, K)."""

    images: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    classes: list[str]

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)

    def confusion_matrix(self) -> np.ndarray:
        return confusion_matrix(self.preds, self.labels, len(self.classes))


def predict_test_set(model, ckpt_path: str | Path, data: DataSource, batch_size: int = 500,
                     report: Report | None = None) -> Predictions:
    """Predictions of ``model`` on the test split of ``data``, computed once and cached per checkpoint.

    Reuses ``test_predictions.npz`` from the checkpoint's run directory when ``cifarlab fit`` wrote it for this
    checkpoint or for one with the same weights (``last.ckpt`` after the tested epoch); otherwise runs the test set
    in batches (``report(done, total)`` after each) and caches the result next to the data.
    """
    test = data.test_set
    images, labels = test.images, test.labels.numpy()
    ckpt_path = Path(ckpt_path).resolve()
    classes = list(model.class_names)
    run_file = Run.of_checkpoint(ckpt_path).test_predictions
    tta = model.tta.level  # in the name: files from before TTA was applied here are not reused
    cache_file = data.cache_dir / f"predictions-tta{tta}-{file_key(ckpt_path)}-{len(labels)}.npz"
    if cache_file.exists():
        found = _read_predictions(cache_file, labels)
        if found is not None:
            return Predictions(images, labels, found[0], classes)
    digest = None  # of the model's weights: computed once, when a file must be checked or written
    if run_file.exists():
        found = _read_predictions(run_file, labels)
        if found is not None:
            probs, z = found
            same_file = Path(str(z["ckpt_path"])).resolve() == ckpt_path if z["ckpt_path"].size else False
            digest = weights_digest(model.state_dict())
            same_weights = str(z.get("weights", "")) == digest
            if same_file or same_weights:
                return Predictions(images, labels, probs, classes)
    probs = []
    desc = f"predicting {len(labels)} test images (once per checkpoint)"
    for start in steps(len(labels), desc, report, batch_size):
        x, _ = test.batch(range(start, min(start + batch_size, len(labels))))
        probs.append(classify(model, x).numpy())
    probs = np.concatenate(probs) if probs else np.zeros((0, len(classes)), np.float32)
    if digest is None:
        digest = weights_digest(model.state_dict())
    save_predictions(cache_file, probs, labels, classes, str(ckpt_path), digest)
    return Predictions(images, labels, probs, classes)


def _read_predictions(path: Path, labels: np.ndarray) -> tuple[np.ndarray, dict] | None:
    """``(probs, arrays)`` of a predictions file made for these ``labels``; ``None`` if damaged or other data."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if "labels" not in arrays or not np.array_equal(arrays["labels"], labels):
        return None
    return arrays["probs"].astype(np.float32), arrays
