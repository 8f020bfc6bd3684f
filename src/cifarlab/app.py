"""The Gradio app: classify any image with its Grad-CAM, browse the test set's mistakes and successes.

    cifarlab app --ckpt runs/seed/version_0/checkpoints/last.ckpt [--data.root DIR] [--host 127.0.0.1] [--port 7860]

Named API endpoints (see the README): ``/classify``, ``/mistakes``, ``/correct``, ``/label_issues``,
``/near_duplicates``, ``/embedding_near`` and, with ``--compare``, ``/compare``.
"""

# ruff: noqa: E402  (the environment is set before the imports that read it)
from __future__ import annotations

import os

# Gradio and huggingface_hub call home on import/launch unless told not to: this app runs offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import io
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from gradio.utils import get_upload_folder
from PIL import Image

from cifarlab import audit
from cifarlab import cam as cams
from cifarlab.checkpoint import load_classifier
from cifarlab.inference import (
    DECODE_MIN_SIZE,
    MAX_IMAGE_BYTES,
    ImageError,
    Predictions,
    classify,
    decode_upload,
    eval_datamodule,
    model_input,
    predict_test_set,
)
from cifarlab.report import class_accuracy, plot_confusion, plot_embedding
from cifarlab.runs import Run

PANEL = 224  # pixels: side of each image panel (the 32x32 input upscaled 7x)
THUMB = 128  # pixels: gallery thumbnails
# Seconds an output image stays in Gradio's cache (enough for a page to show it), so a long-running app's temp
# files stay bounded; Gradio prunes them (its `delete_cache`) once per this period too.
GRADIO_CACHE_AGE = 3600
ANY = "any"
MAP_PIXELS = 760  # side of the embedding map's PNG; a click's pixel coordinates are divided by it
COMPARE_CHOICES = ("A right, B wrong", "B right, A wrong")
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
            import base64

            return base64.b64decode(payload.url.split(",", 1)[1])
        return None

    component.preprocess = preprocess
    return component


class CifarApp:
    """The model and the test-set predictions behind the page; every handler of the page is a method here."""

    def __init__(self, ckpt_path: str | Path, data_root: str | None = None, source: str = "auto",
                 compare: str | Path | None = None, projection: str = "tsne"):
        self.ckpt_path = Path(ckpt_path)
        self.model = load_classifier(self.ckpt_path)
        self.classes = list(self.model.class_names)
        self.layers = cams.target_layers(self.model.net)
        # The other checkpoint of `--compare`: checked before any slow work, so a wrong pair fails at once.
        self.other = load_classifier(compare) if compare else None
        self.other_path = Path(compare) if compare else None
        if self.other is not None:
            audit.check_same_classes(self.classes, list(self.other.class_names), f"--ckpt {ckpt_path}",
                                     f"--compare {compare}")
        # The test set: the given root, else the training data if it is at hand (else the page only classifies).
        dm = eval_datamodule(self.model, data_root, source, required=data_root is not None or compare is not None)
        self.test: Predictions | None = predict_test_set(self.model, self.ckpt_path, dm) if dm else None
        self.audit = audit.DataAudit.build(self.model, self.ckpt_path, self.test, dm, projection) if dm else None
        self.other_test = predict_test_set(self.other, self.other_path, dm) if self.other is not None else None
        self.other_layers = cams.target_layers(self.other.net) if self.other is not None else {}
        self.comparison = (audit.compare_runs(self.test.probs, self.other_test.probs, self.test.labels, self.classes,
                                              list(self.other.class_names)) if self.other_test is not None else None)
        self.run = Run.of_checkpoint(self.ckpt_path)
        self.run_dir = self.run.dir
        self._files = tempfile.TemporaryDirectory(prefix="cifarlab-app-")
        # _png's files live in Gradio's own cache: served from there without a copy, and pruned with it.
        self._panels = Path(get_upload_folder()) / "cifarlab"
        self._panels.mkdir(parents=True, exist_ok=True)
        self._map_extent: dict[str, tuple[float, float, float, float]] = {}  # per colouring: (x0, x1, y0, y1)

    # ------------------------------------------------------------------ classify
    def classify_image(self, image, top_k: int = 3, opacity: float = 0.5, layer: str | None = None,
                       method: str = "Grad-CAM"):
        """Upload -> (top-k label dict, 32x32 input, CAM, overlay, faithfulness text)."""
        if image is None:
            raise gr.Error("Upload an image first.")
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
        cam, seen, heat, over = self._cam_panels(x, [pred], layer, method, opacity, PANEL)
        cam_drop, random_drop = cams.faithfulness(self.model, x, cam, [pred])
        text = faithfulness_text(float(cam_drop[0]), float(random_drop[0]), self.classes[pred])
        return label, self._png(seen[0]), self._png(heat[0]), self._png(over[0]), text

    def _cam_panels(self, x, classes, layer, method, opacity, size):
        layer = layer if layer in self.layers else next(iter(self.layers))
        if method not in cams.CAM_METHODS:
            raise gr.Error(f"unknown CAM method {method!r}: choose one of {', '.join(cams.CAM_METHODS)}")
        maps = cams.compute_cams(self.model, x, self.layers[layer], method, classes)
        images = x.permute(0, 2, 3, 1).numpy()
        seen = [cams.upscale(im, size) for im in images]
        heat = [cams.heatmap(m, size) for m in maps]
        over = [cams.overlay(im, m, opacity, size) for im, m in zip(images, maps)]
        return maps, seen, heat, over

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
            fd, part = tempfile.mkstemp(dir=self._panels, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(part, path)  # readers see no file or the whole file, never part of one
        return str(path)

    # ------------------------------------------------------------------ test-set galleries
    def _need_test(self) -> Predictions:
        if self.test is None:
            raise gr.Error("No test set: start the app with --data.root DIR to browse test images.")
        return self.test

    def select(self, kind: str, true_cls: str = ANY, pred_cls: str = ANY) -> np.ndarray:
        """Indices of test images: ``mistakes`` most-confidently-wrong first, ``correct`` most confident first."""
        t = self._need_test()
        keep = (t.preds != t.labels) if kind == "mistakes" else (t.preds == t.labels)
        if true_cls not in (ANY, None, ""):
            keep &= t.labels == self.classes.index(true_cls)
        if pred_cls not in (ANY, None, ""):
            keep &= t.preds == self.classes.index(pred_cls)
        idx = np.flatnonzero(keep)
        return idx[np.argsort(-t.confidence[idx], kind="stable")]

    def gallery(self, kind: str, true_cls: str = ANY, pred_cls: str = ANY, count: int = 12, opacity: float = 0.5,
                layer: str | None = None, method: str = "Grad-CAM"):
        """Gallery items ``(overlay, caption)`` for the first ``count`` selected test images, and a summary."""
        t = self._need_test()
        idx = self.select(kind, true_cls, pred_cls)
        shown = idx[: int(count)]
        if len(shown) == 0:
            return [], f"0 {kind} in {len(t.labels)} test images for this filter."
        x = torch.from_numpy(t.images[shown]).permute(0, 3, 1, 2).contiguous()
        maps, _, _, over = self._cam_panels(x, t.preds[shown].tolist(), layer, method, opacity, THUMB)
        cam_drop, random_drop = cams.faithfulness(self.model, x, maps, t.preds[shown].tolist())
        items = []
        for j, i in enumerate(shown):
            caption = (f"true {self.classes[t.labels[i]]} | pred {self.classes[t.preds[i]]} "
                       f"{t.confidence[i]:.0%} | CAM drop {cam_drop[j]:+.2f} vs random {random_drop[j]:+.2f}")
            items.append((self._png(over[j]), caption))
        layer = layer if layer in self.layers else next(iter(self.layers))
        summary = (f"{len(idx)} {kind} in {len(t.labels)} test images (showing {len(shown)}); CAM = "
                   f"{method} on {layer}. Mean confidence drop with the CAM's top 20% removed "
                   f"{cam_drop.mean():.3f}, with 20% random pixels removed {random_drop.mean():.3f}.")
        return items, summary

    def mistakes(self, true_cls=ANY, pred_cls=ANY, count=12, opacity=0.5, layer=None, method="Grad-CAM"):
        return self.gallery("mistakes", true_cls, pred_cls, count, opacity, layer, method)

    def correct(self, true_cls=ANY, pred_cls=ANY, count=12, opacity=0.5, layer=None, method="Grad-CAM"):
        return self.gallery("correct", true_cls, pred_cls, count, opacity, layer, method)

    # ------------------------------------------------------------------ confusion + training
    def confusion_outputs(self):
        t = self._need_test()
        cm = t.confusion_matrix()
        path = Path(self._files.name) / "confusion.png"
        if not path.exists():  # the test set never changes: drawn once, not on every page load
            fd, part = tempfile.mkstemp(dir=self._files.name, suffix=".png")
            os.close(fd)
            plot_confusion(cm, self.classes, Path(part))
            os.replace(part, path)  # a page loading meanwhile never reads a half-written file
        per_class = class_accuracy(cm)
        table = [[c, f"{a:.1%}", int(cm[i].sum())] for i, (c, a) in enumerate(zip(self.classes, per_class))]
        matrix = [[self.classes[i], *map(int, row)] for i, row in enumerate(cm)]
        return str(path), table, matrix

    def cell_mistakes(self, evt: gr.SelectData, count: int, opacity: float, layer: str, method: str):
        row, col = evt.index
        if col == 0:
            raise gr.Error("Choose a count cell, not a class name.")
        true_cls, pred_cls = self.classes[row], self.classes[col - 1]
        kind = "correct" if true_cls == pred_cls else "mistakes"
        return self.gallery(kind, true_cls, pred_cls, count, opacity, layer, method)

    # ------------------------------------------------------------------ data audit
    def _need_audit(self) -> audit.DataAudit:
        if self.audit is None:
            raise gr.Error("No test set: start the app with --data.root DIR to audit the data.")
        return self.audit

    def _layer(self, layers: dict, layer: str | None):
        return layers[layer] if layer in layers else next(iter(layers.values()))

    def label_issue_gallery(self, split: str = "test", given_cls: str = ANY, count: int = 12,
                            opacity: float = 0.5, layer: str | None = None, method: str = "Grad-CAM"):
        """cleanlab's likely label errors of ``split`` (test, or train after ``cifarlab audit``), most likely first:
        items ``(image | CAM of the given label | CAM of the suggested label, caption)`` and a summary."""
        a = self._need_audit()
        if split not in ("test", "train"):
            raise gr.Error(f"unknown split {split!r}: choose test or train")
        if split not in a.issues:
            raise gr.Error("No training-set audit yet: run `cifarlab audit --config RECIPE --folds 2 --data.root "
                           "DIR`, then start the app again.")
        issues = a.issues[split]
        t = self._need_test()
        images, labels = (t.images, t.labels) if split == "test" else (a.train_images, a.train_labels)
        probs = t.probs if split == "test" else a.train_probs
        idx = issues.flagged
        if given_cls not in (ANY, None, ""):
            idx = idx[labels[idx] == self.classes.index(given_cls)]
        shown = idx[: int(count)]
        items = []
        if len(shown):
            x = torch.from_numpy(images[shown]).permute(0, 3, 1, 2).contiguous()
            target = self._layer(self.layers, layer)
            given = cams.compute_cams(self.model, x, target, method, labels[shown].tolist())
            suggested = cams.compute_cams(self.model, x, target, method, issues.suggested[shown].tolist())
            for j, i in enumerate(shown):
                panel = audit.side_by_side([cams.upscale(images[i], THUMB),
                                            cams.overlay(images[i], given[j], opacity, THUMB),
                                            cams.overlay(images[i], suggested[j], opacity, THUMB)])
                s = issues.suggested[i]
                caption = (f"{split} #{i}: given {self.classes[labels[i]]} ({probs[i, labels[i]]:.0%}) -> suggested "
                           f"{self.classes[s]} ({probs[i, s]:.0%}) | label quality {issues.quality[i]:.3f}")
                items.append((self._png(panel), caption))
        n = len(labels)
        summary = (f"cleanlab flags **{len(issues.flagged)}** of {n} {split} images ({len(issues.flagged) / n:.1%}) "
                   f"as likely mislabeled (showing {len(shown)} of {len(idx)} for this filter). ")
        if split == "test":
            keep = np.ones(n, bool)
            keep[issues.flagged] = False
            summary += (f"Test accuracy {audit.accuracy(t.preds, t.labels):.2%} on all images, "
                        f"{audit.accuracy(t.preds, t.labels, keep):.2%} without the flagged ones. ")
        else:
            summary += f"Out-of-sample probabilities from {a.train_source}. "
        layer = layer if layer in self.layers else next(iter(self.layers))
        summary += (f"Panels: the image, then {method} on {layer} for the given label, then for the suggested one "
                    "(this checkpoint's CAMs).")
        return items, summary

    def duplicate_gallery(self, threshold: float = audit.DUPLICATE_SIMILARITY, count: int = 12):
        """Test images with a near-duplicate in the training set (most similar first): items
        ``(test image | training image, caption)`` and a summary with the de-duplicated test accuracy."""
        a = self._need_audit()
        t = self._need_test()
        dups = a.duplicates(float(threshold))
        shown = dups[: int(count)]
        items = []
        for i in shown:
            j = a.emb.nearest[i]
            panel = audit.side_by_side([cams.upscale(t.images[i], THUMB), cams.upscale(a.train_images[j], THUMB)])
            same = "" if t.labels[i] == a.train_labels[j] else " | LABELS DIFFER"
            caption = (f"test #{i} {self.classes[t.labels[i]]} (pred {self.classes[t.preds[i]]}) | train #{j} "
                       f"{self.classes[a.train_labels[j]]} | similarity {a.emb.similarity[i]:.3f}{same}")
            items.append((self._png(panel), caption))
        n = len(t.labels)
        keep = np.ones(n, bool)
        keep[dups] = False
        deduplicated = audit.accuracy(t.preds, t.labels, keep)
        summary = (f"**{len(dups)}** of {n} test images ({len(dups) / n:.1%}) have a training image with similarity "
                   f">= {float(threshold):.2f} (showing {len(shown)}). Test accuracy "
                   f"{audit.accuracy(t.preds, t.labels):.2%} on all images, **{deduplicated:.2%}** on the "
                   f"de-duplicated test set ({int(keep.sum())} images)")
        if len(dups):
            summary += f", {audit.accuracy(t.preds, t.labels, ~keep):.2%} on the duplicates themselves"
        summary += (". Similarity: pixel correlation with the closest of the 5 training images nearest in the "
                    "network's features.")
        return items, summary

    def embedding_map(self, color_by: str = "true class") -> str:
        """The test set's 2-D map as a PNG path, coloured by true or predicted class, mistakes ringed."""
        a = self._need_audit()
        t = self._need_test()
        key = "pred" if color_by.startswith("pred") else "true"
        path = Path(self._files.name) / f"map-{key}.png"
        if key not in self._map_extent:
            fd, part = tempfile.mkstemp(dir=self._files.name, suffix=".png")
            os.close(fd)
            labels = t.preds if key == "pred" else t.labels
            self._map_extent[key] = plot_embedding(a.emb.map2d, labels, self.classes, t.preds != t.labels,
                                                   Path(part), title=f"colour: {key} class",
                                                   pixels=MAP_PIXELS)
            os.replace(part, path)
        return str(path)

    def embedding_near(self, x: float, y: float, count: int = 12, opacity: float = 0.5, layer: str | None = None,
                       method: str = "Grad-CAM"):
        """The ``count`` test images nearest to the point ``(x, y)`` of the map image, as fractions of its width and
        height from the top-left corner (a click): gallery items with CAMs and a summary of that region."""
        a = self._need_audit()
        t = self._need_test()
        if not (0 <= float(x) <= 1 and 0 <= float(y) <= 1):
            raise gr.Error("x and y are fractions of the map's width and height, between 0 and 1")
        self.embedding_map()
        x0, x1, y0, y1 = self._map_extent["true"]
        point = np.array([x0 + float(x) * (x1 - x0), y1 - float(y) * (y1 - y0)])
        shown = np.argsort(((a.emb.map2d - point) ** 2).sum(1), kind="stable")[: int(count)]
        xb = torch.from_numpy(t.images[shown]).permute(0, 3, 1, 2).contiguous()
        maps = cams.compute_cams(self.model, xb, self._layer(self.layers, layer), method, t.preds[shown].tolist())
        items = []
        for j, i in enumerate(shown):
            mark = "" if t.preds[i] == t.labels[i] else " | WRONG"
            caption = (f"#{i} true {self.classes[t.labels[i]]} | pred {self.classes[t.preds[i]]} "
                       f"{t.confidence[i]:.0%}{mark}")
            items.append((self._png(cams.overlay(t.images[i], maps[j], opacity, THUMB)), caption))
        true_counts = np.bincount(t.labels[shown], minlength=len(self.classes))
        mix = ", ".join(f"{self.classes[c]} {true_counts[c]}" for c in np.argsort(-true_counts) if true_counts[c])
        wrong = int((t.preds[shown] != t.labels[shown]).sum())
        summary = (f"The {len(shown)} test images nearest to ({point[0]:.1f}, {point[1]:.1f}) on the map: {wrong} "
                   f"mistakes; true classes there: {mix}.")
        return items, summary

    def map_click(self, evt: gr.SelectData, count: int, opacity: float, layer: str, method: str):
        """A click on the map image (pixel coordinates of the PNG) -> ``embedding_near``."""
        px, py = evt.index
        return self.embedding_near(px / MAP_PIXELS, py / MAP_PIXELS, count, opacity, layer, method)

    def _need_other(self) -> Predictions:
        if self.other_test is None:
            raise gr.Error("No second checkpoint: start the app with --compare OTHER.ckpt to compare two runs.")
        return self.other_test

    def compare_table(self) -> list[list]:
        """Per-class accuracy of both checkpoints and B - A, in points."""
        self._need_other()
        c = self.comparison
        rows = [[name, f"{a:.1%}", f"{b:.1%}", f"{100 * (b - a):+.1f}"]
                for name, a, b in zip(self.classes, c.per_class_a, c.per_class_b)]
        return [*rows, ["all", f"{c.acc_a:.2%}", f"{c.acc_b:.2%}", f"{100 * (c.acc_b - c.acc_a):+.2f}"]]

    def compare_gallery(self, which: str = "A right, B wrong", count: int = 12, opacity: float = 0.5,
                        layer: str | None = None, method: str = "Grad-CAM"):
        """Test images that one checkpoint gets right and the other wrong: items ``(image | A's CAM | B's CAM,
        caption)``, each CAM for that checkpoint's own prediction, and a summary."""
        t, o = self._need_test(), self._need_other()
        c = self.comparison
        if which not in COMPARE_CHOICES:
            raise gr.Error(f"choose one of {', '.join(COMPARE_CHOICES)}")
        idx = c.only_a if which == COMPARE_CHOICES[0] else c.only_b
        shown = idx[: int(count)]
        items = []
        if len(shown):
            x = torch.from_numpy(t.images[shown]).permute(0, 3, 1, 2).contiguous()
            cam_a = cams.compute_cams(self.model, x, self._layer(self.layers, layer), method, t.preds[shown].tolist())
            cam_b = cams.compute_cams(self.other, x, self._layer(self.other_layers, layer), method,
                                      o.preds[shown].tolist())
            for j, i in enumerate(shown):
                panel = audit.side_by_side([cams.upscale(t.images[i], THUMB),
                                            cams.overlay(t.images[i], cam_a[j], opacity, THUMB),
                                            cams.overlay(t.images[i], cam_b[j], opacity, THUMB)])
                caption = (f"#{i} true {self.classes[t.labels[i]]} | A: {self.classes[t.preds[i]]} "
                           f"{t.confidence[i]:.0%} | B: {self.classes[o.preds[i]]} {o.confidence[i]:.0%}")
                items.append((self._png(panel), caption))
        summary = (f"A `{self.ckpt_path}` {c.acc_a:.2%}, B `{self.other_path}` {c.acc_b:.2%}: only A is right on "
                   f"**{len(c.only_a)}** test images, only B on **{len(c.only_b)}** (showing {len(shown)} of {which}, "
                   "the other checkpoint's surest wrong answers first). Panels: the image, A's CAM, B's CAM.")
        return items, summary

    def training_files(self) -> dict[str, Path | None]:
        return {"curves": self.run.file("curves.png"), "lr_find": self.run.lr_find_plot,
                "config": self.run.file("config.yaml")}

    def example_files(self, per_class: int = 1) -> list[str]:
        """A few test images saved as PNG for the page's examples (one per class)."""
        if self.test is None:
            return []
        out = []
        for c, name in enumerate(self.classes):
            for i in np.flatnonzero(self.test.labels == c)[:per_class]:
                path = Path(self._files.name) / f"example-{name}-{i}.png"
                Image.fromarray(self.test.images[i]).save(path)
                out.append(str(path))
        return out


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
    """The page: Classify, Mistakes, Correct, Confusion matrix, Likely mislabeled, Near-duplicates, Embedding map,
    Compare (with a second checkpoint) and Training tabs."""
    layer_names = list(app.layers)
    methods = list(cams.CAM_METHODS)
    class_choices = [ANY, *app.classes]
    with gr.Blocks(title="cifarlab", delete_cache=(GRADIO_CACHE_AGE, GRADIO_CACHE_AGE)) as demo:
        gr.Markdown(f"# cifarlab\nCheckpoint `{app.ckpt_path}` · {len(app.classes)} classes: "
                    f"{', '.join(app.classes)}")
        with gr.Row():
            layer = gr.Dropdown(layer_names, value=layer_names[0], label="CAM target layer (output size)")
            method = gr.Dropdown(methods, value=methods[0], label="CAM method")
            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
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
            examples = app.example_files()
            if examples:
                gr.Examples(examples=[[p] for p in examples], inputs=[upload], label="Test-set examples")
            inputs = [upload, top_k, opacity, layer, method]
            outputs = [label, seen, heat, over, faith]
            run.click(app.classify_image, inputs, outputs, api_name="classify")
            upload.upload(app.classify_image, inputs, outputs, api_visibility="private")

        gallery_controls = {}
        for kind in ("mistakes", "correct"):
            with gr.Tab("Mistakes" if kind == "mistakes" else "Correct"):
                with gr.Row():
                    true_cls = gr.Dropdown(class_choices, value=ANY, label="True class")
                    pred_cls = gr.Dropdown(class_choices, value=ANY, label="Predicted class")
                    count = gr.Slider(1, 64, value=12, step=1, label="Images")
                    show = gr.Button("Show", variant="primary")
                summary = gr.Markdown()
                gallery = gr.Gallery(label=kind.capitalize(), columns=6, height="auto", format="png")
                fn = app.mistakes if kind == "mistakes" else app.correct
                show.click(fn, [true_cls, pred_cls, count, opacity, layer, method], [gallery, summary], api_name=kind)
                gallery_controls[kind] = (count, gallery, summary)

        with gr.Tab("Confusion matrix"):
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
            matrix.select(app.cell_mistakes, [count_cm, opacity, layer, method], [cell_gallery, cell_summary],
                          api_visibility="private")
            if app.test is not None:
                demo.load(app.confusion_outputs, None, [cm_image, per_class, matrix], api_visibility="private")

        with gr.Tab("Likely mislabeled"):
            gr.Markdown("Images whose given label cleanlab finds likely wrong, from out-of-sample probabilities "
                        "(the test set always; the training set after `cifarlab audit`).")
            with gr.Row():
                # `train` is always offered: without `cifarlab audit` choosing it says what to run.
                li_split = gr.Dropdown(["test", "train"], value="test", label="Split")
                li_cls = gr.Dropdown(class_choices, value=ANY, label="Given label")
                li_count = gr.Slider(1, 64, value=12, step=1, label="Images")
                li_show = gr.Button("Show", variant="primary", elem_id="label-issues-show")
            li_summary = gr.Markdown(elem_id="label-issues-summary")
            # Wide panels: "contain" shows all three (the default "cover" crops them to squares).
            li_gallery = gr.Gallery(label="image | CAM of the given label | CAM of the suggested label", columns=3,
                                    height="auto", format="png", object_fit="contain")
            li_show.click(app.label_issue_gallery, [li_split, li_cls, li_count, opacity, layer, method],
                          [li_gallery, li_summary], api_name="label_issues")

        with gr.Tab("Near-duplicates"):
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
                           api_name="near_duplicates")

        with gr.Tab("Embedding map"):
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
            map_image.select(app.map_click, [map_count, opacity, layer, method], [map_gallery, map_summary],
                             api_visibility="private")
            near_x = gr.Number(value=0.5, visible=False)
            near_y = gr.Number(value=0.5, visible=False)
            gr.Button(visible=False).click(app.embedding_near, [near_x, near_y, map_count, opacity, layer, method],
                                           [map_gallery, map_summary], api_name="embedding_near")
            color_by.change(app.embedding_map, [color_by], [map_image], api_visibility="private")
            if app.audit is not None:
                demo.load(app.embedding_map, [color_by], [map_image], api_visibility="private")

        if app.other is not None:
            with gr.Tab("Compare"):
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
                cmp_show.click(app.compare_gallery, [cmp_which, cmp_count, opacity, layer, method],
                               [cmp_gallery, cmp_summary], api_name="compare")
                demo.load(app.compare_table, None, [cmp_table], api_visibility="private")

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
    return demo


def launch(app: CifarApp, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True):
    """Serve the page on ``host:port`` (loopback by default, never a public share link)."""
    demo = build_app(app)
    demo.queue(default_concurrency_limit=1)  # one model, two cores: requests run one at a time, in order
    allowed = [str(p.parent) for p in app.training_files().values() if p]
    demo.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_IMAGE_BYTES, show_error=True,
                ssr_mode=False, theme=THEME, allowed_paths=allowed, prevent_thread_lock=not block,
                footer_links=["api"], quiet=not block)
    return demo
