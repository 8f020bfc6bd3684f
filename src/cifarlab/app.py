"""The Gradio app: classify any image with its Grad-CAM, browse the test set's mistakes, audit the data.

    cifarlab app --ckpt runs/seed/version_0/checkpoints/last.ckpt [--data.root DIR] [--host 127.0.0.1] [--port 7860]

The page is served as soon as the checkpoint is read: Classify works at once. The test set, its predictions, the
data audit (label issues, features, the embedding map, the duplicate search) and a second checkpoint's predictions
are prepared in a background thread (``Preparation``), each data tab showing what it waits for and filling itself
when it is ready.

Named API endpoints (see docs/app.md): ``/classify``, ``/status``, ``/mistakes``, ``/correct``, ``/label_issues``,
``/outliers``, ``/near_duplicates``, ``/test_duplicates``, ``/embedding_near`` and, with ``--compare``,
``/compare``. A data endpoint called before its data is ready answers with an error saying what it waits for
(``/status`` tells the progress).
"""

# ruff: noqa: E402  (the environment is set before the imports that read it)
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

# Gradio and huggingface_hub call home on import/launch unless told not to: this app runs offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _NoStubWriting(importlib.abc.MetaPathFinder):
    """Loads ``gradio.component_meta`` without its ``create_or_modify_pyi``, which re-parses and rewrites a ``.pyi``
    stub beside each of Gradio's ~80 component classes on every import: 1-1.5 s of a 2-core start, for stubs that
    only an editor reads (https://github.com/gradio-app/gradio/issues/7791). Fenced in tests/test_private_apis.py."""

    def find_spec(self, name, path=None, target=None):
        if name != "gradio.component_meta":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            module.create_or_modify_pyi = _no_stub

        spec.loader.exec_module = exec_module
        return spec


def _no_stub(component_class, class_name, events) -> None:
    """Gradio's stub writer, replaced: the page needs no editor stubs."""


if "gradio" not in sys.modules:
    sys.meta_path.insert(0, _NoStubWriting())

import base64
import copy
import hashlib
import io
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from gradio.utils import get_upload_folder
from PIL import Image

from cifarlab import audit, views
from cifarlab import cam as cams
from cifarlab.checkpoint import load_classifier
from cifarlab.errors import CifarlabError
from cifarlab.files import atomic_path, write_bytes
from cifarlab.inference import (
    DECODE_MIN_SIZE,
    MAX_IMAGE_BYTES,
    ImageError,
    Predictions,
    classify,
    decode_upload,
    eval_data,
    model_input,
    predict_test_set,
)
from cifarlab.plots import plot_confusion, plot_embedding
from cifarlab.runs import Run
from cifarlab.views import ANY, COMPARE_CHOICES

PANEL = 224  # pixels: side of each image panel (the 32x32 input upscaled 7x)
THUMB = 128  # pixels: gallery thumbnails
# Seconds an output image stays in Gradio's cache (enough for a page to show it), so a long-running app's temp
# files stay bounded; Gradio prunes them (its `delete_cache`) once per this period too.
GRADIO_CACHE_AGE = 3600
MAP_PIXELS = 760  # side of the embedding map's PNG; a click's pixel coordinates are divided by it
POLL_S = 1.0  # seconds between the page's progress updates while data is being prepared
# Every event that runs the model joins one queue: Gradio gives each event listener its own queue otherwise, and two
# CAMs at once on one network clash in its hooks and autograd ("cannot call bump_version() on undefined tensor").
ONE_AT_A_TIME = {"concurrency_id": "model", "concurrency_limit": 1}
# System fonts: the default theme fetches Google Fonts, and the page must request nothing off this machine.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def raw_upload(component: gr.Image) -> gr.Image:
    """Make an image upload hand the handler the file untouched (its path, or bytes for a pasted image).

    ``gr.Image`` opens every upload with PIL before the handler runs, so a non-image fails with a raw PIL
    message and no pixel limit applies first; ``inference.decode_upload`` does both, with clear messages.
    (Overridden on the instance: a gr.Image subclass would make Gradio write a .pyi stub into the package.)
    """

    def preprocess(payload):
        if payload is None:
            return None
        if payload.path:
            return payload.path
        if payload.url and payload.url.startswith("data:"):
            return base64.b64decode(payload.url.split(",", 1)[1])
        return None

    component.preprocess = preprocess
    return component


# ---------------------------------------------------------------------------------------------- background work
@dataclass
class Step:
    """One piece of background work: what it computes, its state (waiting, running, ready, failed) and progress."""

    key: str
    what: str
    run: Callable[[Callable[[int, int], None]], None]
    state: str = "waiting"
    done: int = 0
    total: int = 0
    started: float = 0.0
    error: str = ""

    def report(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def describe(self) -> str:
        if self.state == "running":
            count = f": {self.done:,} of {self.total:,} ({self.done / self.total:.0%})" if self.total else ""
            return f"{self.what}{count}, {time.monotonic() - self.started:.0f} s so far"
        return f"{self.what} ({self.state}{': ' + self.error if self.error else ''})"


class Preparation:
    """The data tabs' work, step by step in one background thread, in the order the tabs need it; a step that
    fails marks the steps after it failed too, and says why on the page and on the terminal."""

    def __init__(self, steps: list[Step]):
        self.steps = {s.key: s for s in steps}
        self._thread = threading.Thread(target=self._work, name="cifarlab-prepare", daemon=True)
        self._changed = threading.Condition()

    def start(self) -> None:
        if not self._thread.is_alive() and all(s.state == "waiting" for s in self.steps.values()):
            self._thread.start()

    def _work(self) -> None:
        failed = ""
        for step in self.steps.values():
            if failed:
                step.state, step.error = "failed", failed
                continue
            step.state, step.started = "running", time.monotonic()
            try:
                step.run(step.report)
                step.state = "ready"
            except Exception as err:  # shown on the page and on the terminal: the app keeps serving Classify
                step.state, step.error = "failed", str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                failed = f"needs {step.what}, which failed"
                print(f"cifarlab app: {step.what} failed: {step.error}", flush=True)
            with self._changed:
                self._changed.notify_all()

    def ready(self, key: str) -> bool:
        return key in self.steps and self.steps[key].state == "ready"

    def finished(self) -> bool:
        return all(s.state in ("ready", "failed") for s in self.steps.values())

    def wait(self, key: str | None = None, timeout: float | None = None) -> bool:
        """Block until step ``key`` (default: every step) is ready or failed; whether it is ready."""
        self.start()
        keys = [key] if key else list(self.steps)
        with self._changed:
            self._changed.wait_for(lambda: all(self.steps[k].state in ("ready", "failed") for k in keys), timeout)
        return all(self.ready(k) for k in keys)

    def waiting_for(self, key: str) -> str:
        """Markdown for a tab that needs step ``key``: empty when it is ready, else what runs now and what it waits
        for."""
        step = self.steps.get(key)
        if step is None or step.state == "ready":
            return ""
        if step.state == "failed":
            return f"**Not available**: {step.what} failed ({step.error})."
        current = next((s for s in self.steps.values() if s.state == "running"), None)
        now = f" Now: {current.describe()}." if current is not None and current is not step else ""
        return f"⏳ Preparing: **{step.describe()}**.{now} This tab fills itself when it is ready."

    def status(self) -> dict:
        """Every step's state and progress (the ``/status`` endpoint)."""
        return {s.key: {"what": s.what, "state": s.state, "done": s.done, "total": s.total, "error": s.error}
                for s in self.steps.values()}


# ---------------------------------------------------------------------------------------------- the app
class CifarApp:
    """The model, the data behind the page (prepared in the background) and every handler of the page."""

    def __init__(self, ckpt_path: str | Path, data_root: str | None = None, source: str = "auto",
                 compare: str | Path | None = None, projection: str = "tsne", ensemble: list[str | Path] = ()):
        self.ckpt_path = Path(ckpt_path)
        self.model = load_classifier(self.ckpt_path)
        self.classes = list(self.model.class_names)
        self.layers = views.layers_of(self.model.net)
        # The other checkpoint of `--compare`: checked before any slow work, so a wrong pair fails at once.
        self.other = load_classifier(compare) if compare else None
        self.other_path = Path(compare) if compare else None
        if self.other is not None:
            audit.check_same_classes(self.classes, list(self.other.class_names), f"--ckpt {ckpt_path}",
                                     f"--compare {compare}")
        self.ensemble = audit.load_ensemble(list(ensemble), self.classes, ckpt_path)  # the label ranking's members
        if data_root is not None and not Path(data_root).expanduser().is_dir():
            raise CifarlabError(f"--data.root {data_root} is not a folder: pass the ImageFolder root (with train/ and "
                                "test/) or leave it out to use the data the checkpoint was trained on")
        self.data_root, self.source, self.projection = data_root, source, projection
        self.dm = None
        self.test: Predictions | None = None
        self.audit: audit.DataAudit | None = None
        self.other_test: Predictions | None = None
        self.comparison: audit.Comparison | None = None
        self.run = Run.of_checkpoint(self.ckpt_path)
        self.run_dir = self.run.dir
        self._files = tempfile.TemporaryDirectory(prefix="cifarlab-app-")
        # _png's files live in Gradio's own cache: served from there without a copy, and pruned with it.
        self._panels = Path(get_upload_folder()) / "cifarlab"
        self._panels.mkdir(parents=True, exist_ok=True)
        self._map_extent: dict[str, tuple[float, float, float, float]] = {}  # per colouring: (x0, x1, y0, y1)
        # The background work runs on copies: a forward pass on the page's model while a request's CAM hooks (or the
        # features' hook) are attached would land in the other's captures.
        self._work_model = copy.deepcopy(self.model)
        self._work_other = copy.deepcopy(self.other) if self.other is not None else None
        self.prep = Preparation(self._steps())

    def _steps(self) -> list[Step]:
        """The background work, in the order the tabs need it (the audit's own steps come from ``DataAudit``)."""
        steps = [Step("data", "the test set", self._load_data),
                 Step("test", "the test-set predictions", self._predict)]
        if self.other is not None:
            steps.append(Step("compare", "the second checkpoint's test-set predictions", self._predict_other))
        placeholder = audit.DataAudit(None, self.ckpt_path, None, None, self.projection, ensemble=self.ensemble)
        for key, what, _ in placeholder.steps():
            steps.append(Step(key, what, self._audit_step(key)))
        return steps

    def _load_data(self, report) -> None:
        required = self.data_root is not None or self.other is not None
        self.dm = eval_data(self.model, self.data_root, self.source, required=required)
        if self.dm is None:
            raise CifarlabError("the training data is not at hand: start the app with --data.root DIR to browse "
                                "test images")

    def _predict(self, report) -> None:
        self.test = predict_test_set(self._work_model, self.ckpt_path, self.dm, report=report)
        self.audit = audit.DataAudit(self._work_model, self.ckpt_path, self.test, self.dm, self.projection,
                                     ensemble=self.ensemble)

    def _predict_other(self, report) -> None:
        self.other_test = predict_test_set(self._work_other, self.other_path, self.dm, report=report)
        self.comparison = audit.compare_runs(self.test.probs, self.other_test.probs, self.test.labels, self.classes,
                                             list(self.other.class_names))

    def _audit_step(self, key: str):
        def run(report):
            step = next(fn for k, _, fn in self.audit.steps() if k == key)  # this app's audit, once it exists
            step(report)
        return run

    def start(self) -> CifarApp:
        """Start preparing the data tabs in the background."""
        self.prep.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every data tab is prepared (tests, scripts); whether all of it succeeded."""
        return self.prep.wait(timeout=timeout)

    def _need(self, key: str) -> None:
        if not self.prep.ready(key):
            raise gr.Error(self.prep.waiting_for(key).replace("**", "") or f"{key} is not ready")

    # ------------------------------------------------------------------ classify
    def classify_image(self, image, top_k: int = 3, opacity: float = 0.5, layer: str | None = None,
                       method: str = "Grad-CAM"):
        """Upload -> (top-k label dict, 32x32 input, CAM, overlay, faithfulness text)."""
        if image is None:
            raise gr.Error("Upload an image first.")
        if method not in cams.CAM_METHODS:
            raise gr.Error(f"unknown CAM method {method!r}: choose one of {', '.join(cams.CAM_METHODS)}")
        try:
            pixels = decode_upload(image, min_size=DECODE_MIN_SIZE)
        except ImageError as err:
            raise gr.Error(str(err)) from None
        except OSError as err:
            raise gr.Error(f"the upload could not be read ({err})") from None
        x = model_input(pixels)  # (1, 3, 32, 32) uint8: exactly what the model sees
        probs = classify(self.model, x)[0]
        top_k = int(max(1, min(int(top_k), len(self.classes))))
        top = torch.topk(probs, top_k)
        label = {self.classes[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}
        pred = int(top.indices[0])
        image = x[0].permute(1, 2, 0).numpy()
        cam = views.cam_maps(self.model, x, [pred], views.CamSettings(layer, method))
        cam_drop, random_drop = cams.faithfulness(self.model, x, cam, [pred])
        text = faithfulness_text(float(cam_drop[0]), float(random_drop[0]), self.classes[pred])
        return (label, self._png(cams.upscale(image, PANEL)), self._png(cams.heatmap(cam[0], PANEL)),
                self._png(cams.overlay(image, cam[0], opacity, PANEL)), text)

    def _png(self, pixels: np.ndarray) -> str:
        """``pixels`` (H, W, 3) uint8 as a PNG file named by its content, written once; returns its path.

        Handed an array, Gradio encodes it and rewrites the file named by its hash in place, so when two requests
        make the same image (the same upload twice, two people on one gallery) a client still downloading the
        first copy gets a truncated body. This file is written beside and renamed into place instead.
        """
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="png")
        data = buffer.getvalue()
        path = self._panels / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        if path.exists():
            os.utime(path)  # in use again: Gradio's pruning ages files by their ctime
        else:
            write_bytes(path, data)  # readers see no file or the whole file, never part of one
        return str(path)

    def _gallery(self, view: views.View) -> tuple[list, str]:
        return [(self._png(p), c) for p, c in zip(view.panels, view.captions)], view.summary

    def example_files(self, per_class: int = 1) -> list[str]:
        """A few test images saved as PNG for the page's examples (one per class), once the test set is loaded."""
        if self.dm is None:
            return []
        test = self.dm.test_set
        labels = test.labels.numpy()
        out = []
        for c, name in enumerate(self.classes):
            for i in np.flatnonzero(labels == c)[:per_class]:
                path = Path(self._files.name) / f"example-{name}-{i}.png"
                if not path.exists():
                    Image.fromarray(test.images[i]).save(path)
                out.append(str(path))
        return out

    # ------------------------------------------------------------------ test-set galleries
    def select(self, kind: str, true_cls: str = ANY, pred_cls: str = ANY) -> np.ndarray:
        """Indices of test images: ``mistakes`` most-confidently-wrong first, ``correct`` most confident first."""
        self._need("test")
        return views.select(self.test, kind, views.class_filter(self.classes, true_cls),
                            views.class_filter(self.classes, pred_cls))

    def gallery(self, kind: str, true_cls: str = ANY, pred_cls: str = ANY, count: int = 12, opacity: float = 0.5,
                layer: str | None = None, method: str = "Grad-CAM"):
        """Gallery items ``(overlay, caption)`` for the first ``count`` selected test images, and a summary."""
        self._need("test")
        view = views.predictions_view(self.model, self.test, kind, views.class_filter(self.classes, true_cls),
                                      views.class_filter(self.classes, pred_cls), count,
                                      views.CamSettings(layer, method, opacity, THUMB))
        return self._gallery(view)

    def mistakes(self, true_cls=ANY, pred_cls=ANY, count=12, opacity=0.5, layer=None, method="Grad-CAM"):
        return self.gallery("mistakes", true_cls, pred_cls, count, opacity, layer, method)

    def correct(self, true_cls=ANY, pred_cls=ANY, count=12, opacity=0.5, layer=None, method="Grad-CAM"):
        return self.gallery("correct", true_cls, pred_cls, count, opacity, layer, method)

    # ------------------------------------------------------------------ confusion + training
    def confusion_outputs(self):
        self._need("test")
        cm = self.test.confusion_matrix()
        path = Path(self._files.name) / "confusion.png"
        if not path.exists():  # the test set never changes: drawn once, not on every page load
            with atomic_path(path) as part:  # a page loading meanwhile never reads a half-written file
                plot_confusion(cm, self.classes, part)
        matrix = [[self.classes[i], *map(int, row)] for i, row in enumerate(cm)]
        return str(path), views.per_class_rows(cm, self.classes), matrix

    def cell_mistakes(self, evt: gr.SelectData, count: int, opacity: float, layer: str, method: str):
        row, col = evt.index
        if col == 0:
            raise gr.Error("Choose a count cell, not a class name.")
        true_cls, pred_cls = self.classes[row], self.classes[col - 1]
        kind = "correct" if true_cls == pred_cls else "mistakes"
        return self.gallery(kind, true_cls, pred_cls, count, opacity, layer, method)

    # ------------------------------------------------------------------ data audit
    def label_issue_gallery(self, split: str = "test", given_cls: str = ANY, count: int = 12,
                            opacity: float = 0.5, layer: str | None = None, method: str = "Grad-CAM"):
        """cleanlab's likely label errors of ``split`` (test, or train after ``cifarlab audit``), most likely first:
        items ``(image | CAM of the given label | CAM of the suggested label, caption)`` and a summary."""
        if split not in ("test", "train"):
            raise gr.Error(f"unknown split {split!r}: choose test or train")
        self._need("issues")
        if split not in self.audit.issues:
            raise gr.Error("No training-set audit yet: run `cifarlab audit --config RECIPE --folds 2 --data.root "
                           "DIR`, then start the app again.")
        view = views.label_issues_view(self.model, self.audit, split, views.class_filter(self.classes, given_cls),
                                       count, views.CamSettings(layer, method, opacity, THUMB))
        return self._gallery(view)

    def duplicate_gallery(self, threshold: float = audit.DUPLICATE_SIMILARITY, count: int = 12):
        """Test images with a near-duplicate in the training set (most similar first): items
        ``(test image | training image, caption)`` and a summary with the de-duplicated test accuracy."""
        self._need("duplicates")
        return self._gallery(views.duplicates_view(self.audit, float(threshold), count, THUMB))

    def test_duplicate_gallery(self, threshold: float = audit.DUPLICATE_SIMILARITY, count: int = 12):
        """Pairs of test images that are near-duplicates of each other (most similar first): items
        ``(test image | test image, caption)`` and a summary."""
        self._need("duplicates")
        return self._gallery(views.test_pairs_view(self.audit, float(threshold), count, THUMB))

    def outlier_gallery(self, split: str = "test", given_cls: str = ANY, count: int = 12):
        """The images of ``split`` least like the training set (cleanlab's out-of-distribution score), most unusual
        first: items ``(image, caption)`` and a summary."""
        if split not in ("test", "train"):
            raise gr.Error(f"unknown split {split!r}: choose test or train")
        self._need("outliers")
        view = views.outliers_view(self.audit, split, views.class_filter(self.classes, given_cls), count, THUMB)
        return self._gallery(view)

    def embedding_map(self, color_by: str = "true class") -> str:
        """The test set's 2-D map as a PNG path, coloured by true or predicted class, mistakes ringed."""
        self._need("map")
        t = self.test
        key = "pred" if color_by.startswith("pred") else "true"
        path = Path(self._files.name) / f"map-{key}.png"
        if key not in self._map_extent:
            labels = t.preds if key == "pred" else t.labels
            with atomic_path(path) as part:
                self._map_extent[key] = plot_embedding(self.audit.map2d, labels, self.classes, t.preds != t.labels,
                                                       part, title=f"colour: {key} class", pixels=MAP_PIXELS)
        return str(path)

    def embedding_near(self, x: float, y: float, count: int = 12, opacity: float = 0.5, layer: str | None = None,
                       method: str = "Grad-CAM"):
        """The ``count`` test images nearest to the point ``(x, y)`` of the map image, as fractions of its width and
        height from the top-left corner (a click): gallery items with CAMs and a summary of that region."""
        if not (0 <= float(x) <= 1 and 0 <= float(y) <= 1):
            raise gr.Error("x and y are fractions of the map's width and height, between 0 and 1")
        self.embedding_map()
        x0, x1, y0, y1 = self._map_extent["true"]
        point = np.array([x0 + float(x) * (x1 - x0), y1 - float(y) * (y1 - y0)])
        view = views.near_point_view(self.model, self.test, self.audit.map2d, point, count,
                                     views.CamSettings(layer, method, opacity, THUMB))
        return self._gallery(view)

    def map_click(self, evt: gr.SelectData, count: int, opacity: float, layer: str, method: str):
        """A click on the map image (pixel coordinates of the PNG) -> ``embedding_near``."""
        px, py = evt.index
        return self.embedding_near(px / MAP_PIXELS, py / MAP_PIXELS, count, opacity, layer, method)

    def compare_table(self) -> list[list]:
        """Per-class accuracy of both checkpoints and B - A, in points."""
        if self.other is None:
            raise gr.Error("No second checkpoint: start the app with --compare OTHER.ckpt to compare two runs.")
        self._need("compare")
        return views.comparison_rows(self.comparison, self.classes)

    def compare_gallery(self, which: str = COMPARE_CHOICES[0], count: int = 12, opacity: float = 0.5,
                        layer: str | None = None, method: str = "Grad-CAM"):
        """Test images that one checkpoint gets right and the other wrong: items ``(image | A's CAM | B's CAM,
        caption)``, each CAM for that checkpoint's own prediction, and a summary."""
        if which not in COMPARE_CHOICES:
            raise gr.Error(f"choose one of {', '.join(COMPARE_CHOICES)}")
        self.compare_table()
        view = views.comparison_view(self.model, self.other, self.test, self.other_test, self.comparison, which,
                                     count, views.CamSettings(layer, method, opacity, THUMB), f"`{self.ckpt_path}`",
                                     f"`{self.other_path}`")
        return self._gallery(view)

    def training_files(self) -> dict[str, Path | None]:
        return {"curves": self.run.file("curves.png"), "lr_find": self.run.lr_find_plot,
                "config": self.run.file("config.yaml")}

    # ------------------------------------------------------------------ progress on the page
    # Which step each data tab waits for, in the page's order.
    TAB_NEEDS = {"examples": "data", "mistakes": "test", "correct": "test", "confusion": "test",
                 "issues": "issues", "outliers": "outliers", "map": "map", "duplicates": "duplicates",
                 "compare": "compare"}

    def poll(self, tabs: list[str] | None = None):
        """The waiting text and the ready flag of each data tab in ``tabs`` (default: all, in ``TAB_NEEDS``'s order),
        and whether the page should keep polling."""
        tabs = tabs or [k for k in self.TAB_NEEDS if k != "compare" or self.other is not None]
        texts = [self.prep.waiting_for(self.TAB_NEEDS[k]) for k in tabs]
        flags = [self.prep.ready(self.TAB_NEEDS[k]) for k in tabs]
        return (*texts, *flags, gr.Timer(active=not self.prep.finished()))


def faithfulness_text(cam_drop: float, random_drop: float, cls: str) -> str:
    """One line comparing the confidence drop when the CAM's top 20% vs 20% random pixels are removed."""
    if random_drop > 1e-4:
        verdict = f"{cam_drop / random_drop:.1f}x the drop of random removal"
    else:
        verdict = "random removal did not lower it at all"
    return (f"**Faithfulness**: removing the CAM's top 20% pixels changes P({cls}) by **{-cam_drop:+.3f}**; "
            f"removing 20% random pixels, by {-random_drop:+.3f} ({verdict}). A CAM that points at what the "
            "model uses lowers the confidence much more than random removal does.")


def build_app(app: CifarApp) -> gr.Blocks:
    """The page: Classify, Mistakes, Correct, Confusion matrix, Likely mislabeled, Unusual images, Near-duplicates,
    Embedding map, Compare (with a second checkpoint) and Training tabs. Data tabs fill themselves as their data gets
    ready."""
    layer_names = list(app.layers)
    methods = list(cams.CAM_METHODS)
    class_choices = [ANY, *app.classes]
    waiting: dict[str, gr.Markdown] = {}  # per data tab: what it waits for
    ready: dict[str, gr.State] = {}  # per data tab: a flag whose change (False -> True) fills the tab

    def status(key: str, elem_id: str | None = None):
        waiting[key] = gr.Markdown(app.prep.waiting_for(app.TAB_NEEDS[key]), elem_id=elem_id)
        ready[key] = gr.State(False)
        return ready[key]

    with gr.Blocks(title="cifarlab", delete_cache=(GRADIO_CACHE_AGE, GRADIO_CACHE_AGE)) as demo:
        gr.Markdown(f"# cifarlab\nCheckpoint `{app.ckpt_path}` · {len(app.classes)} classes: "
                    f"{', '.join(app.classes)}")
        with gr.Row():
            layer = gr.Dropdown(layer_names, value=layer_names[0], label="CAM target layer (output size)")
            method = gr.Dropdown(methods, value=methods[0], label="CAM method")
            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
        cam_inputs = [opacity, layer, method]

        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = raw_upload(gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                                 label="Image (any size; resized to 32x32)", elem_id="upload",
                                                 height=260))
                    top_k = gr.Slider(1, len(app.classes), value=min(3, len(app.classes)), step=1, label="Top k")
                    run = gr.Button("Classify", variant="primary", elem_id="classify")
                with gr.Column(scale=2):
                    label = gr.Label(label="Top classes", elem_id="label")
                    with gr.Row():
                        seen = gr.Image(label="Model input (32x32)", type="numpy", format="png")
                        heat = gr.Image(label="CAM", type="numpy", format="png")
                        over = gr.Image(label="Overlay", type="numpy", format="png")
                    faith = gr.Markdown()
            examples = gr.Gallery(label="Test-set examples (click one to classify it)", columns=10, height="auto",
                                  allow_preview=False, elem_id="examples")
            examples_ready = status("examples")
            inputs = [upload, top_k, *cam_inputs]
            outputs = [label, seen, heat, over, faith]
            run.click(app.classify_image, inputs, outputs, api_name="classify", **ONE_AT_A_TIME)
            upload.upload(app.classify_image, inputs, outputs, api_visibility="private", **ONE_AT_A_TIME)
            examples_ready.change(app.example_files, None, [examples], api_visibility="private", **ONE_AT_A_TIME)
            picked = examples.select(_example_path, None, [upload], api_visibility="private")
            picked.then(app.classify_image, inputs, outputs, api_visibility="private", **ONE_AT_A_TIME)

        for kind in ("mistakes", "correct"):
            with gr.Tab("Mistakes" if kind == "mistakes" else "Correct"):
                flag = status(kind)
                with gr.Row():
                    true_cls = gr.Dropdown(class_choices, value=ANY, label="True class")
                    pred_cls = gr.Dropdown(class_choices, value=ANY, label="Predicted class")
                    count = gr.Slider(1, 64, value=12, step=1, label="Images")
                    show = gr.Button("Show", variant="primary")
                summary = gr.Markdown()
                gallery = gr.Gallery(label=kind.capitalize(), columns=6, height="auto", format="png")
                fn = app.mistakes if kind == "mistakes" else app.correct
                controls = [true_cls, pred_cls, count, *cam_inputs]
                show.click(fn, controls, [gallery, summary], api_name=kind, **ONE_AT_A_TIME)
                _refresh_on(flag, fn, controls, [gallery, summary], [true_cls, pred_cls, count])

        with gr.Tab("Confusion matrix"):
            flag = status("confusion")
            gr.Markdown("Rows are true classes, columns predicted. Click a count to see those images.")
            with gr.Row():
                cm_image = gr.Image(label="Confusion matrix", type="filepath", interactive=False)
                per_class = gr.Dataframe(headers=["class", "accuracy", "images"], label="Per-class accuracy",
                                         interactive=False)
            matrix = gr.Dataframe(headers=["true \\ pred", *app.classes], label="Counts (click a cell)",
                                  interactive=False)
            cell_summary = gr.Markdown()
            cell_gallery = gr.Gallery(columns=6, height="auto", format="png")
            count_cm = gr.Slider(1, 64, value=12, step=1, label="Images")
            matrix.select(app.cell_mistakes, [count_cm, *cam_inputs], [cell_gallery, cell_summary],
                          api_visibility="private", **ONE_AT_A_TIME)
            flag.change(_when_ready(app.confusion_outputs, 3), [flag], [cm_image, per_class, matrix],
                        api_visibility="private", **ONE_AT_A_TIME)

        with gr.Tab("Likely mislabeled"):
            flag = status("issues")
            gr.Markdown("Images whose given label cleanlab finds likely wrong, from out-of-sample probabilities "
                        "(the test set always; the training set after `cifarlab audit`).")
            # `train` is always offered: without `cifarlab audit` choosing it says what to run.
            filters, li_show, li_summary = _split_filters(class_choices, "label-issues")
            # Wide panels: "contain" shows all three (the default "cover" crops them to squares).
            li_gallery = gr.Gallery(label="image | CAM of the given label | CAM of the suggested label", columns=3,
                                    height="auto", format="png", object_fit="contain")
            controls = [*filters, *cam_inputs]
            li_show.click(app.label_issue_gallery, controls, [li_gallery, li_summary],
                          api_name="label_issues", **ONE_AT_A_TIME)
            _refresh_on(flag, app.label_issue_gallery, controls, [li_gallery, li_summary], filters)

        with gr.Tab("Unusual images"):
            flag = status("outliers")
            gr.Markdown("Images least like the training set, by cleanlab's out-of-distribution score from the "
                        "network's features: pictures that may belong to no class at all, whatever their label.")
            filters, out_show, out_summary = _split_filters(class_choices, "outliers")
            out_gallery = gr.Gallery(label="most unusual first", columns=6, height="auto", format="png")
            out_show.click(app.outlier_gallery, filters, [out_gallery, out_summary],
                           api_name="outliers", **ONE_AT_A_TIME)
            _refresh_on(flag, app.outlier_gallery, filters, [out_gallery, out_summary], filters)

        with gr.Tab("Near-duplicates"):
            flag = status("duplicates")
            gr.Markdown("Test images with a near-copy in the training set: they inflate test accuracy.")
            with gr.Row():
                dup_threshold = gr.Slider(0.0, 1.0, value=audit.DUPLICATE_SIMILARITY, step=0.01,
                                          label="Similarity threshold")
                dup_count = gr.Slider(1, 64, value=12, step=1, label="Pairs")
                dup_show = gr.Button("Show", variant="primary", elem_id="duplicates-show")
            dup_summary = gr.Markdown(elem_id="duplicates-summary")
            dup_gallery = gr.Gallery(label="test image | training image", columns=4, height="auto", format="png",
                                     object_fit="contain")
            dup_show.click(app.duplicate_gallery, [dup_threshold, dup_count], [dup_gallery, dup_summary],
                           api_name="near_duplicates", **ONE_AT_A_TIME)
            _refresh_on(flag, app.duplicate_gallery, [dup_threshold, dup_count], [dup_gallery, dup_summary],
                        [dup_threshold, dup_count])
            gr.Markdown("**Within the test set**: pairs of test images that are one photograph twice.")
            pair_summary = gr.Markdown(elem_id="test-duplicates-summary")
            pair_gallery = gr.Gallery(label="test image | test image", columns=4, height="auto", format="png",
                                      object_fit="contain")
            gr.Button(visible=False).click(app.test_duplicate_gallery, [dup_threshold, dup_count],
                                           [pair_gallery, pair_summary], api_name="test_duplicates", **ONE_AT_A_TIME)
            _refresh_on(flag, app.test_duplicate_gallery, [dup_threshold, dup_count], [pair_gallery, pair_summary],
                        [dup_threshold, dup_count])

        with gr.Tab("Embedding map"):
            flag = status("map")
            gr.Markdown("The test set's penultimate features in 2-D; mistakes are ringed. Click the map to see the "
                        "images there with their prediction and CAM.")
            with gr.Row():
                color_by = gr.Radio(["true class", "predicted class"], value="true class", label="Colour by")
                map_count = gr.Slider(1, 64, value=12, step=1, label="Images near a click")
            with gr.Row():
                map_image = gr.Image(label="Embedding map (click a point)", type="filepath", interactive=False,
                                     elem_id="embedding-map", height=MAP_PIXELS)
                with gr.Column():
                    map_summary = gr.Markdown(elem_id="embedding-summary")
                    map_gallery = gr.Gallery(columns=4, height="auto", format="png")
            map_image.select(app.map_click, [map_count, *cam_inputs], [map_gallery, map_summary],
                             api_visibility="private", **ONE_AT_A_TIME)
            near_x = gr.Number(value=0.5, visible=False)
            near_y = gr.Number(value=0.5, visible=False)
            gr.Button(visible=False).click(app.embedding_near, [near_x, near_y, map_count, *cam_inputs],
                                           [map_gallery, map_summary], api_name="embedding_near", **ONE_AT_A_TIME)
            color_by.change(app.embedding_map, [color_by], [map_image], api_visibility="private", **ONE_AT_A_TIME)
            flag.change(_when_ready(app.embedding_map, 1), [flag, color_by], [map_image],
                        api_visibility="private", **ONE_AT_A_TIME)

        if app.other is not None:
            with gr.Tab("Compare"):
                flag = status("compare")
                gr.Markdown(f"A = `{app.ckpt_path}`, B = `{app.other_path}`: per-class accuracy, and the test "
                            "images one gets right and the other wrong, with both CAMs.")
                cmp_table = gr.Dataframe(headers=["class", "A", "B", "B - A (points)"], interactive=False,
                                         label="Per-class accuracy")
                with gr.Row():
                    cmp_which = gr.Radio(list(COMPARE_CHOICES), value=COMPARE_CHOICES[0], label="Show")
                    cmp_count = gr.Slider(1, 64, value=12, step=1, label="Images")
                    cmp_show = gr.Button("Show", variant="primary", elem_id="compare-show")
                cmp_summary = gr.Markdown(elem_id="compare-summary")
                cmp_gallery = gr.Gallery(label="image | A's CAM | B's CAM", columns=3, height="auto", format="png",
                                         object_fit="contain")
                controls = [cmp_which, cmp_count, *cam_inputs]
                cmp_show.click(app.compare_gallery, controls, [cmp_gallery, cmp_summary],
                               api_name="compare", **ONE_AT_A_TIME)
                flag.change(_when_ready(app.compare_table, 1), [flag], [cmp_table],
                            api_visibility="private", **ONE_AT_A_TIME)
                _refresh_on(flag, app.compare_gallery, controls, [cmp_gallery, cmp_summary], [cmp_which, cmp_count])

        with gr.Tab("Training"):
            files = app.training_files()
            if not any(files.values()):
                gr.Markdown(f"No curves, LR-finder plot or config found next to the checkpoint ({app.run_dir}).")
            if files["curves"]:
                gr.Image(str(files["curves"]), label="Loss and accuracy per epoch", interactive=False)
            if files["lr_find"]:
                gr.Image(str(files["lr_find"]), label="LR range test", interactive=False)
            if files["config"]:
                gr.Code(files["config"].read_text(), language="yaml", label="config.yaml", interactive=False)

        # Progress: one timer per page polls the background work until it is done; a flag that turns True fills
        # its tab. The poll is cheap, so it does not wait behind CAM requests (no concurrency limit); it stays queued
        # because a State's change event fires only for queued events.
        status_json = gr.JSON(visible=False)
        gr.Button(visible=False).click(app.prep.status, None, [status_json], api_name="status")
        timer = gr.Timer(POLL_S)
        keys = list(waiting)  # the page's order

        def poll():
            return app.poll(keys)

        poll_outputs = [*(waiting[k] for k in keys), *(ready[k] for k in keys), timer]
        for event in (timer.tick, demo.load):
            event(poll, None, poll_outputs, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    return demo


def _split_filters(class_choices: list[str], elem_prefix: str):
    """A row of split (test or train), given label and image count with a Show button, and the summary under it:
    ``([split, label, count], button, summary)``."""
    with gr.Row():
        filters = [gr.Dropdown(["test", "train"], value="test", label="Split"),
                   gr.Dropdown(class_choices, value=ANY, label="Given label"),
                   gr.Slider(1, 64, value=12, step=1, label="Images")]
        show = gr.Button("Show", variant="primary", elem_id=f"{elem_prefix}-show")
    return filters, show, gr.Markdown(elem_id=f"{elem_prefix}-summary")


def _when_ready(fn, outputs: int):
    """``fn``'s outputs once the tab's ready flag (the first argument) is True; unchanged before that."""
    def handler(flag, *args):
        if not flag:
            return gr.skip() if outputs == 1 else tuple(gr.skip() for _ in range(outputs))
        return fn(*args)
    return handler


def _refresh_on(flag: gr.State, fn, inputs: list, outputs: list, controls: list) -> None:
    """Fill a gallery when its data gets ready, and again whenever one of its ``controls`` changes (a slider when it
    is let go), so that no "Show" click is needed."""
    handler = _when_ready(fn, len(outputs))
    flag.change(handler, [flag, *inputs], outputs, api_visibility="private", **ONE_AT_A_TIME)
    for control in controls:
        event = control.release if isinstance(control, gr.Slider) else control.change
        event(handler, [flag, *inputs], outputs, api_visibility="private", **ONE_AT_A_TIME)


def _example_path(evt: gr.SelectData) -> str:
    """The file of the clicked example, handed to the upload box."""
    return evt.value["image"]["path"]


def launch(app: CifarApp, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True,
           prepare: bool = True):
    """Serve the page on ``host:port`` (loopback by default, never a public share link), then prepare the data tabs
    in the background (unless ``prepare`` is False: Classify alone, as the latency benchmark measures it)."""
    demo = build_app(app)
    demo.queue(default_concurrency_limit=1)  # and ONE_AT_A_TIME across events: one model, two cores
    allowed = [str(p.parent) for p in app.training_files().values() if p]
    demo.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_IMAGE_BYTES, show_error=True,
                ssr_mode=False, theme=THEME, allowed_paths=allowed, prevent_thread_lock=True,
                footer_links=["api"], quiet=not block)
    # The CAM library loads behind the page: the first Classify would otherwise wait seconds for the import.
    threading.Thread(target=cams.load_library, name="cam-library", daemon=True).start()
    if prepare:
        app.start()
    if block:
        demo.block_thread()
    return demo
