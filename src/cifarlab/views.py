"""What the app's tabs and the report's sections show, computed once for both: which images, their panels (image,
CAMs), captions and the summary's numbers. Arrays in, a ``View`` out; each front end only draws it (the app as a
gallery, the report as a captioned grid).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cifarlab import cam as cams
from cifarlab import duplicates as dup
from cifarlab.audit import DataAudit, LabelIssues, accuracy, side_by_side
from cifarlab.inference import Predictions
from cifarlab.metrics import class_accuracy
from cifarlab.transforms import to_batch

ANY = "any"  # a class filter that keeps every class
COMPARE_CHOICES = ("A right, B wrong", "B right, A wrong")


@dataclass
class View:
    """Image panels ``(H, W, 3)`` uint8 with one caption each, and a one-paragraph summary (plain text)."""

    panels: list[np.ndarray]
    captions: list[str]
    summary: str


@dataclass
class CamSettings:
    """How CAM panels are drawn: the target layer by name (``cam.target_layers``; the deepest when a network has no
    layer of that name), the method, the overlay's opacity and the panel's side in pixels."""

    layer: str | None = None
    method: str = "Grad-CAM"
    opacity: float = 0.5
    size: int = 128


@functools.cache
def layers_of(net: nn.Module) -> dict[str, nn.Module]:
    """``cam.target_layers`` of a network, found once (it runs a forward pass)."""
    return cams.target_layers(net)


def cam_layer(model, name: str | None) -> tuple[str, nn.Module]:
    """``(label, layer)``: the layer called ``name`` in ``model``'s network, else its deepest candidate."""
    return cams.resolve_layer(layers_of(model.net), name)


def cam_maps(model, images: np.ndarray | torch.Tensor, classes, cam: CamSettings) -> np.ndarray:
    """CAMs ``(B, 32, 32)`` of uint8 images (``(B, 32, 32, 3)`` arrays or the model's ``(B, 3, 32, 32)`` batch),
    one class per image."""
    _, layer = cam_layer(model, cam.layer)
    x = images if isinstance(images, torch.Tensor) else to_batch(images)
    return cams.compute_cams(model, x, layer, cam.method, [int(c) for c in classes])


def cam_rows(images: np.ndarray, maps: list[np.ndarray], cam: CamSettings, gap: int = 4) -> list[np.ndarray]:
    """One panel per image: the image, then its overlay with each CAM of ``maps`` (each ``(B, 32, 32)``)."""
    return [side_by_side([cams.upscale(im, cam.size)] + [cams.overlay(im, m[j], cam.opacity, cam.size) for m in maps],
                         gap) for j, im in enumerate(images)]


def class_filter(classes: list[str], name: str | None) -> int | None:
    """The index of class ``name``, or ``None`` for ``any`` (or nothing chosen)."""
    return None if name in (ANY, None, "") else classes.index(name)


# ---------------------------------------------------------------------------------------------- predictions
def select(test: Predictions, kind: str, true_cls: int | None = None, pred_cls: int | None = None) -> np.ndarray:
    """Indices of test images: ``mistakes`` most-confidently-wrong first, ``correct`` most confident first."""
    keep = (test.preds != test.labels) if kind == "mistakes" else (test.preds == test.labels)
    if true_cls is not None:
        keep &= test.labels == true_cls
    if pred_cls is not None:
        keep &= test.preds == pred_cls
    idx = np.flatnonzero(keep)
    return idx[np.argsort(-test.confidence[idx], kind="stable")]


def predictions_view(model, test: Predictions, kind: str, true_cls: int | None = None, pred_cls: int | None = None,
                     count: int = 12, cam: CamSettings | None = None) -> View:
    """The first ``count`` of ``select``'s images, each with the CAM of its prediction over it, and the CAM's
    faithfulness (confidence drop with its top 20% pixels removed, against 20% random pixels)."""
    cam = cam or CamSettings()
    idx = select(test, kind, true_cls, pred_cls)
    shown = idx[: int(count)]
    n = len(test.labels)
    if len(shown) == 0:
        return View([], [], f"0 {kind} in {n} test images for this filter.")
    classes = test.classes
    label, _ = cam_layer(model, cam.layer)
    x = to_batch(test.images[shown])
    maps = cam_maps(model, x, test.preds[shown], cam)
    cam_drop, random_drop = cams.faithfulness(model, x, maps, test.preds[shown].tolist())
    panels = [cams.overlay(test.images[i], maps[j], cam.opacity, cam.size) for j, i in enumerate(shown)]
    captions = [f"true {classes[test.labels[i]]} | pred {classes[test.preds[i]]} {test.confidence[i]:.0%} | "
                f"CAM drop {cam_drop[j]:+.2f} vs random {random_drop[j]:+.2f}" for j, i in enumerate(shown)]
    summary = (f"{len(idx)} {kind} in {n} test images (showing {len(shown)}); CAM = {cam.method} on {label}. Mean "
               f"confidence drop with the CAM's top 20% removed {cam_drop.mean():.3f}, with 20% random pixels "
               f"removed {random_drop.mean():.3f}.")
    return View(panels, captions, summary)


def per_class_rows(confmat: np.ndarray, classes: list[str]) -> list[list]:
    """``[class, accuracy, images]`` per true class of a confusion matrix."""
    acc = class_accuracy(confmat)
    return [[c, f"{a:.1%}", int(confmat[i].sum())] for i, (c, a) in enumerate(zip(classes, acc))]


def near_point_view(model, test: Predictions, map2d: np.ndarray, point: np.ndarray, count: int = 12,
                    cam: CamSettings | None = None) -> View:
    """The ``count`` test images nearest to ``point`` (map units) on the embedding map, with their CAMs."""
    cam = cam or CamSettings()
    classes = test.classes
    shown = np.argsort(((map2d - point) ** 2).sum(1), kind="stable")[: int(count)]
    maps = cam_maps(model, test.images[shown], test.preds[shown], cam)
    panels = [cams.overlay(test.images[i], maps[j], cam.opacity, cam.size) for j, i in enumerate(shown)]
    captions = [f"#{i} true {classes[test.labels[i]]} | pred {classes[test.preds[i]]} {test.confidence[i]:.0%}"
                f"{'' if test.preds[i] == test.labels[i] else ' | WRONG'}" for i in shown]
    counts = np.bincount(test.labels[shown], minlength=len(classes))
    mix = ", ".join(f"{classes[c]} {counts[c]}" for c in np.argsort(-counts, kind="stable") if counts[c])
    wrong = int((test.preds[shown] != test.labels[shown]).sum())
    summary = (f"The {len(shown)} test images nearest to ({point[0]:.1f}, {point[1]:.1f}) on the map: {wrong} "
               f"mistakes; true classes there: {mix}.")
    return View(panels, captions, summary)


# ---------------------------------------------------------------------------------------------- data audit
def label_issues_view(model, audit: DataAudit, split: str = "test", given_cls: int | None = None, count: int = 12,
                      cam: CamSettings | None = None) -> View:
    """cleanlab's likely label errors of ``split`` (``test``, or ``train`` after ``cifarlab audit``), most likely
    first: panels ``image | CAM of the given label | CAM of the suggested label``."""
    cam = cam or CamSettings()
    test = audit.test
    issues: LabelIssues = audit.issues[split]
    images, labels = (test.images, test.labels) if split == "test" else (audit.train_images, audit.train_labels)
    probs = audit.test_probs if split == "test" else audit.train_probs
    classes = list(model.class_names)
    idx = issues.flagged
    if given_cls is not None:
        idx = idx[labels[idx] == given_cls]
    shown = idx[: int(count)]
    panels, captions = [], []
    if len(shown):
        given = cam_maps(model, images[shown], labels[shown], cam)
        suggested = cam_maps(model, images[shown], issues.suggested[shown], cam)
        panels = cam_rows(images[shown], [given, suggested], cam)
        for i in shown:
            s = issues.suggested[i]
            captions.append(f"{split} #{i}: given {classes[labels[i]]} ({probs[i, labels[i]]:.0%}) -> suggested "
                            f"{classes[s]} ({probs[i, s]:.0%}) | label quality {issues.quality[i]:.3f}")
    n = len(labels)
    summary = (f"cleanlab flags {len(issues.flagged)} of {n} {split} images ({len(issues.flagged) / max(n, 1):.1%}) "
               f"as likely mislabeled (showing {len(shown)} of {len(idx)} for this filter). ")
    if split == "test":
        keep = np.ones(n, bool)
        keep[issues.flagged] = False
        summary += (f"Ranked from {audit.test_source}. Test accuracy {accuracy(test.preds, labels):.2%} on all "
                    f"images, {accuracy(test.preds, labels, keep):.2%} without the flagged ones. ")
    else:
        summary += f"Out-of-sample probabilities from {audit.train_source}. "
    label, _ = cam_layer(model, cam.layer)
    summary += (f"Panels: the image, then {cam.method} on {label} for the given label, then for the suggested one "
                "(this checkpoint's CAMs).")
    return View(panels, captions, summary)


def duplicates_view(audit: DataAudit, threshold: float, count: int = 12, size: int = 128) -> View:
    """Test images with a near-duplicate in the training set, most similar first: panels ``test | training``, and
    the test accuracy with and without them."""
    test = audit.test
    classes = test.classes
    dups = audit.duplicates(float(threshold))
    shown = dups[: int(count)]
    panels, captions = [], []
    for i in shown:
        j = audit.nearest[i]
        panels.append(side_by_side([cams.upscale(test.images[i], size), cams.upscale(audit.train_images[j], size)]))
        differ = "" if test.labels[i] == audit.train_labels[j] else " | LABELS DIFFER"
        captions.append(f"test #{i} {classes[test.labels[i]]} (pred {classes[test.preds[i]]}) | train #{j} "
                        f"{classes[audit.train_labels[j]]} | similarity {audit.similarity[i]:.3f}{differ}")
    n = len(test.labels)
    keep = np.ones(n, bool)
    keep[dups] = False
    summary = (f"{len(dups)} of {n} test images ({len(dups) / max(n, 1):.1%}) have a training image with similarity "
               f">= {float(threshold):.2f} (showing {len(shown)}). Test accuracy "
               f"{accuracy(test.preds, test.labels):.2%} on all images, {accuracy(test.preds, test.labels, keep):.2%} "
               f"on the de-duplicated test set ({int(keep.sum())} images)")
    if len(dups):
        summary += f", {accuracy(test.preds, test.labels, ~keep):.2%} on the duplicates themselves"
    summary += (f". Similarity: the best correlation of the two images' band-passed grey levels over shifts of up to "
                f"{dup.SHIFT} pixels, zooms and the mirror, against the {dup.FEATURE_CANDIDATES} training images "
                f"nearest in the network's features and the {dup.EDGE_CANDIDATES} nearest by edge directions.")
    return View(panels, captions, summary)


def test_pairs_view(audit: DataAudit, threshold: float, count: int = 12, size: int = 128) -> View:
    """Pairs of test images that are near-duplicates of each other, most similar first: panels ``test | test``. Such
    a pair counts one photograph twice in the test accuracy."""
    test = audit.test
    classes = test.classes
    pairs, scores = audit.test_pairs(float(threshold))
    shown = pairs[: int(count)]
    panels, captions = [], []
    for (i, j), score in zip(shown, scores):
        panels.append(side_by_side([cams.upscale(test.images[i], size), cams.upscale(test.images[j], size)]))
        differ = "" if test.labels[i] == test.labels[j] else " | LABELS DIFFER"
        captions.append(f"test #{i} {classes[test.labels[i]]} | test #{j} {classes[test.labels[j]]} | similarity "
                        f"{score:.3f}{differ}")
    in_pairs = len(np.unique(pairs)) if len(pairs) else 0
    summary = (f"{len(pairs)} pairs of test images ({in_pairs} images) are near-duplicates of each other at "
               f"similarity >= {float(threshold):.2f} (showing {len(shown)}); "
               f"{int(sum(test.labels[i] != test.labels[j] for i, j in pairs))} of them with different labels.")
    return View(panels, captions, summary)


def outliers_view(audit: DataAudit, split: str = "test", given_cls: int | None = None, count: int = 12,
                  size: int = 128) -> View:
    """The images of ``split`` least like the training set, most unusual first: what may belong to no class at all
    (a label error has a typical image and a wrong label; an outlier is an unusual image, whatever its label)."""
    test = audit.test
    classes = test.classes
    scores = audit.outliers[split]
    labels = test.labels if split == "test" else audit.train_labels
    images = test.images if split == "test" else audit.train_images
    idx = audit.most_unusual(split)
    if given_cls is not None:
        idx = idx[labels[idx] == given_cls]
    shown = idx[: int(count)]
    panels = [cams.upscale(images[i], size) for i in shown]
    captions = []
    for i in shown:
        pred = f" | pred {classes[test.preds[i]]} {test.confidence[i]:.0%}" if split == "test" else ""
        captions.append(f"{split} #{i}: labelled {classes[labels[i]]}{pred} | outlier score {scores[i]:.3f}")
    summary = (f"The {len(shown)} {split} images least like the training set (of {len(idx)} for this filter), by "
               "cleanlab's out-of-distribution score from the network's features (the distance to their nearest "
               f"training images; median over the {split} set {float(np.median(scores)):.3f}). An unusual image may "
               "belong to no class at all, whatever its label: see Likely mislabeled for typical images with a "
               "wrong label.")
    if split == "test" and len(shown):
        summary += f" The model is right on {accuracy(test.preds[shown], test.labels[shown]):.0%} of those shown."
    return View(panels, captions, summary)


# ---------------------------------------------------------------------------------------------- two runs
def comparison_rows(comparison, classes: list[str]) -> list[list]:
    """``[class, A, B, B - A in points]`` per class, and a last row for all images."""
    c = comparison
    rows = [[name, f"{a:.1%}", f"{b:.1%}", f"{100 * (b - a):+.1f}"]
            for name, a, b in zip(classes, c.per_class_a, c.per_class_b)]
    return [*rows, ["all", f"{c.acc_a:.2%}", f"{c.acc_b:.2%}", f"{100 * (c.acc_b - c.acc_a):+.2f}"]]


def comparison_view(model_a, model_b, test_a: Predictions, test_b: Predictions, comparison, which: str,
                    count: int = 12, cam: CamSettings | None = None, name_a: str = "A", name_b: str = "B") -> View:
    """Test images that one checkpoint gets right and the other wrong (``which`` of ``COMPARE_CHOICES``): panels
    ``image | A's CAM | B's CAM``, each CAM for that checkpoint's own prediction."""
    cam = cam or CamSettings()
    c = comparison
    classes = test_a.classes
    idx = c.only_a if which == COMPARE_CHOICES[0] else c.only_b
    shown = idx[: int(count)]
    panels, captions = [], []
    if len(shown):
        maps_a = cam_maps(model_a, test_a.images[shown], test_a.preds[shown], cam)
        maps_b = cam_maps(model_b, test_a.images[shown], test_b.preds[shown], cam)
        panels = cam_rows(test_a.images[shown], [maps_a, maps_b], cam)
        captions = [f"#{i} true {classes[test_a.labels[i]]} | A: {classes[test_a.preds[i]]} {test_a.confidence[i]:.0%}"
                    f" | B: {classes[test_b.preds[i]]} {test_b.confidence[i]:.0%}" for i in shown]
    summary = (f"A {name_a} {c.acc_a:.2%}, B {name_b} {c.acc_b:.2%}: only A is right on {len(c.only_a)} test images, "
               f"only B on {len(c.only_b)} (showing {len(shown)} of {which}, the other checkpoint's surest wrong "
               "answers first). Panels: the image, A's CAM, B's CAM.")
    return View(panels, captions, summary)
