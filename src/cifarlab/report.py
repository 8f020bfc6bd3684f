"""Plots and files that describe a run: curves, confusion matrix, image grids, test metrics."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cifarlab.progress import progress  # noqa: E402


def write_json(data: dict, path: Path) -> None:
    """Write ``data`` as indented JSON, atomically (a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_predictions(path: Path, probs: np.ndarray, labels: np.ndarray, classes: list[str], ckpt_path: str) -> None:
    """Test-set class probabilities ``(N, K)`` (float16), true labels and the checkpoint they came from."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, probs=probs.astype(np.float16), labels=labels.astype(np.int64), classes=np.array(classes),
             ckpt_path=np.array(str(ckpt_path)))
    os.replace(tmp, path)


def class_accuracy(confmat: np.ndarray) -> np.ndarray:
    """Accuracy ``(K,)`` of each true class from a ``(K, K)`` confusion matrix (rows = truth; 0 for an empty row)."""
    confmat = np.asarray(confmat)
    return confmat.diagonal() / np.maximum(confmat.sum(1), 1)


def metrics_from_confusion(confmat: np.ndarray, classes: list[str], test_loss: float) -> dict:
    """``test_acc``, ``test_loss`` and per-class accuracy from a ``(K, K)`` confusion matrix (rows = truth)."""
    confmat = np.asarray(confmat, dtype=np.int64)
    per_class = class_accuracy(confmat)
    return {
        "test_acc": float(confmat.diagonal().sum() / max(confmat.sum(), 1)),
        "test_loss": float(test_loss),
        "num_images": int(confmat.sum()),
        "per_class_acc": {c: float(a) for c, a in zip(classes, per_class)},
        "confusion_matrix": confmat.tolist(),
        "classes": list(classes),
    }


def plot_confusion(confmat: np.ndarray, classes: list[str], path: Path, title: str = "Test confusion matrix") -> None:
    """Counts per (true, predicted) cell, with per-class accuracy on the y labels."""
    confmat = np.asarray(confmat)
    k = len(classes)
    acc = class_accuracy(confmat)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * k, 0.8 + 0.7 * k))
    ax.imshow(confmat, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} ({a:.1%})" for c, a in zip(classes, acc)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (per-class accuracy)")
    threshold = confmat.max() / 2 if confmat.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(confmat[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if confmat[i, j] > threshold else "black")
    ax.set_title(f"{title}: {confmat.diagonal().sum() / max(confmat.sum(), 1):.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger ``metrics.csv`` as ``{metric: [(epoch, value), ...]}`` (empty cells dropped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = int(float(row.get("epoch") or 0))
            for name, value in row.items():
                if name not in ("epoch", "step") and value not in ("", None):
                    series.setdefault(name, []).append((epoch, float(value)))
    return series


def plot_curves(metrics_csv: Path, path: Path) -> bool:
    """Loss and accuracy per epoch (train vs val) from ``metrics.csv``; False when there is nothing to plot."""
    series = read_metrics_csv(metrics_csv)
    pairs = [("loss", "train_loss_epoch", "val_loss"), ("accuracy", "train_acc", "val_acc")]
    if not any(k in series for _, *keys in pairs for k in keys):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (label, *keys) in zip(axes, pairs):
        for key in keys:
            if key in series:
                epochs, values = zip(*series[key])
                ax.plot(np.array(epochs) + 1, values, marker="o", label=key.removesuffix("_epoch"))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_embedding(points: np.ndarray, labels: np.ndarray, classes: list[str], mistakes: np.ndarray, path: Path,
                   title: str = "", pixels: int = 760) -> tuple[float, float, float, float]:
    """A 2-D map ``points`` (N, 2) coloured by ``labels``, ``mistakes`` (a boolean mask) ringed in black, drawn
    with the axes filling the whole ``pixels``-square image (no frame) so that a click's pixel maps straight back
    to the map. Returns the extent ``(x0, x1, y0, y1)`` in map units: the image's left, right, bottom, top."""
    fig = plt.figure(figsize=(pixels / 100, pixels / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    colors = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        mine = labels == c
        ax.scatter(points[mine, 0], points[mine, 1], s=3, color=colors(c % colors.N), label=name, linewidths=0)
    ax.scatter(points[mistakes, 0], points[mistakes, 1], s=14, facecolors="none", edgecolors="black",
               linewidths=0.5, label="mistake")
    pad = 0.03 * (points.max(0) - points.min(0) + 1e-6)
    x0, y0 = points.min(0) - pad
    x1, y1 = points.max(0) + pad
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.axis("off")
    ax.legend(loc="upper right", fontsize=7, markerscale=3, framealpha=0.7, title=title or None, title_fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return float(x0), float(x1), float(y0), float(y1)


def save_image_grid(images: np.ndarray, captions: list[str], path: Path, cols: int = 8, title: str = "") -> None:
    """``(N, 3, H, W)`` or ``(N, H, W, 3)`` uint8 images in a captioned grid, upscaled without smoothing."""
    images = np.asarray(images)
    if images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    rows = math.ceil(len(images) / cols)
    width = 1.5 * max(1.0, images.shape[2] / images.shape[1])  # inches per cell: wide panels get wide cells
    height = width * images.shape[1] / images.shape[2] + 0.3  # the image, and a line of caption
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + (0.4 if title else 0)))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, cap in zip(np.atleast_1d(axes).ravel(), images, captions):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(cap, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(model, test, ckpt_path: Path, out: Path, count: int = 32, layer: str | None = None,
                 method: str = "Grad-CAM", data_audit=None, other=None, other_test=None,
                 dup_threshold: float | None = None) -> Path:
    """A self-contained report folder: ``index.html`` and its PNGs (curves, LR finder, confusion matrix,
    per-class accuracy, the most-confidently-wrong test images with their CAMs; with ``data_audit``
    (``audit.DataAudit``) likely label errors, near-duplicates and the embedding map; with ``other`` and
    ``other_test``, a second checkpoint compared). Returns the HTML path."""
    import html
    import shutil

    import torch

    from cifarlab import cam as cams

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from cifarlab.runs import Run

    run = Run.of_checkpoint(ckpt_path)
    run_dir = run.dir
    classes = list(model.class_names)
    cm = test.confusion_matrix()
    plot_confusion(cm, classes, out / "confusion_matrix.png")
    sections = []
    curves = run_dir / "curves.png"
    if not curves.exists() and (run_dir / "metrics.csv").exists():
        plot_curves(run_dir / "metrics.csv", out / "curves.png")
    elif curves.exists():
        shutil.copy(curves, out / "curves.png")
    if (out / "curves.png").exists():
        sections.append("<h2>Training curves</h2><img src='curves.png' alt='loss and accuracy per epoch'>")
    lr_plot = run.lr_find_plot
    if lr_plot is not None:
        shutil.copy(lr_plot, out / "lr_find.png")
        sections.append("<h2>LR range test</h2><img src='lr_find.png' alt='LR finder'>")
    acc = cm.diagonal().sum() / max(cm.sum(), 1)
    per_class = class_accuracy(cm)
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{a:.1%}</td><td>{int(n)}</td></tr>"
                   for c, a, n in zip(classes, per_class, cm.sum(1)))
    sections.append(f"<h2>Test set: {acc:.2%} of {int(cm.sum())} images</h2>"
                    "<img src='confusion_matrix.png' alt='confusion matrix'>"
                    f"<table><tr><th>class</th><th>accuracy</th><th>images</th></tr>{rows}</table>")
    wrong = np.flatnonzero(test.preds != test.labels)
    wrong = wrong[np.argsort(-test.confidence[wrong], kind="stable")][:count]
    if len(wrong):
        layers = cams.target_layers(model.net)
        layer = layer if layer in layers else next(iter(layers))
        x = torch.from_numpy(test.images[wrong]).permute(0, 3, 1, 2).contiguous()
        maps = cams.compute_cams(model, x, layers[layer], method, test.preds[wrong].tolist())
        overlays = np.stack([cams.overlay(test.images[i], m, 0.5, 96) for i, m in zip(wrong, maps)])
        captions = [f"{classes[test.labels[i]]} -> {classes[test.preds[i]]} {test.confidence[i]:.0%}" for i in wrong]
        save_image_grid(overlays, captions, out / "mistakes.png",
                        title=f"Most confidently wrong (true -> predicted), {method} on {layer}")
        sections.append("<h2>Most confidently wrong</h2><img src='mistakes.png' alt='mistakes with CAMs'>")
    if data_audit is not None:
        sections += _audit_sections(model, test, data_audit, out, count, layer, method, dup_threshold)
    if other is not None:
        sections += _compare_sections(model, test, other, other_test, out, count, layer, method)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cifarlab report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
            "td,th{padding:2px 12px;text-align:left}</style></head><body><h1>cifarlab report</h1>"
            f"<p>Checkpoint <code>{html.escape(str(ckpt_path))}</code></p>{''.join(sections)}</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"


def _cam_grid(models_classes, images: np.ndarray, captions: list[str], path: Path, title: str, layer, method) -> None:
    """A captioned grid of ``image | CAM | CAM ...`` panels: one CAM per ``(model, classes)`` pair, each for its own
    class list (one class per image)."""
    import torch

    from cifarlab import cam as cams
    from cifarlab.audit import side_by_side

    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    maps = []
    for model, classes in models_classes:
        layers = cams.target_layers(model.net)
        target = layers[layer] if layer in layers else next(iter(layers.values()))
        maps.append(cams.compute_cams(model, x, target, method, list(map(int, classes))))
    panels = [side_by_side([cams.upscale(im, 64)] + [cams.overlay(im, m[j], 0.5, 64) for m in maps], gap=2)
              for j, im in enumerate(images)]
    save_image_grid(np.stack(panels), captions, path, cols=4, title=title)


def _audit_sections(model, test, data_audit, out: Path, count: int, layer, method, dup_threshold) -> list[str]:
    """Likely label errors (test, and train after ``cifarlab audit``), near-duplicates, the embedding map."""
    from cifarlab import audit

    classes = list(model.class_names)
    threshold = audit.DUPLICATE_SIMILARITY if dup_threshold is None else dup_threshold
    sections = []
    steps = [("test", test.images, test.labels)]
    if "train" in data_audit.issues:
        steps.append(("train", data_audit.train_images, data_audit.train_labels))
    for split, images, labels in progress(steps, "report: likely label errors", unit="split"):
        issues = data_audit.issues[split]
        shown = issues.flagged[:count]
        text = (f"<h2>Likely mislabeled {split} images (cleanlab)</h2><p>{len(issues.flagged)} of {len(labels)} "
                f"{split} images ({len(issues.flagged) / len(labels):.1%}) are flagged")
        if split == "test":
            keep = np.ones(len(labels), bool)
            keep[issues.flagged] = False
            text += (f"; test accuracy {audit.accuracy(test.preds, labels):.2%} on all images, "
                     f"{audit.accuracy(test.preds, labels, keep):.2%} without them")
        else:
            text += f" (out-of-sample probabilities from {data_audit.train_source})"
        sections.append(text + ".</p>")
        if len(shown):
            captions = [f"{classes[labels[i]]} -> {classes[issues.suggested[i]]} q={issues.quality[i]:.2f}"
                        for i in shown]
            _cam_grid([(model, labels[shown]), (model, issues.suggested[shown])], images[shown], captions,
                      out / f"mislabeled_{split}.png", f"image | {method}: given label | suggested label", layer,
                      method)
            sections.append(f"<img src='mislabeled_{split}.png' alt='likely mislabeled {split} images'>")
    dups = data_audit.duplicates(threshold)
    keep = np.ones(len(test.labels), bool)
    keep[dups] = False
    sections.append(f"<h2>Near-duplicates of training images in the test set</h2><p>{len(dups)} of "
                    f"{len(test.labels)} test images ({len(dups) / len(test.labels):.1%}) have a training image with "
                    f"similarity &ge; {threshold:.2f}; test accuracy {audit.accuracy(test.preds, test.labels):.2%} on "
                    f"all images, {audit.accuracy(test.preds, test.labels, keep):.2%} on the de-duplicated test set."
                    "</p>")
    if len(dups):
        shown = dups[:count]
        nearest = data_audit.emb.nearest[shown]
        pairs = np.stack([audit.side_by_side([test.images[i], data_audit.train_images[j]], gap=2)
                          for i, j in zip(shown, nearest)])
        captions = [f"{classes[test.labels[i]]} | {classes[data_audit.train_labels[j]]} "
                    f"{data_audit.emb.similarity[i]:.3f}" for i, j in zip(shown, nearest)]
        save_image_grid(pairs, captions, out / "near_duplicates.png", cols=6,
                        title="test image | its near-duplicate in the training set (labels, similarity)")
        sections.append("<img src='near_duplicates.png' alt='near-duplicate pairs'>")
    plot_embedding(data_audit.emb.map2d, test.labels, classes, test.preds != test.labels, out / "embedding_map.png",
                   title="true class")
    sections.append("<h2>Embedding map of the test set</h2><p>Penultimate features in 2-D, coloured by true "
                    "class; mistakes ringed in black.</p><img src='embedding_map.png' alt='embedding map'>")
    return sections


def _compare_sections(model, test, other, other_test, out: Path, count: int, layer, method) -> list[str]:
    """Per-class accuracy of two checkpoints, and the images only one of them gets right, with both CAMs."""
    import html

    from cifarlab import audit

    classes = list(model.class_names)
    c = audit.compare_runs(test.probs, other_test.probs, test.labels, classes, list(other.class_names))
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{a:.1%}</td><td>{b:.1%}</td><td>{100 * (b - a):+.1f}</td></tr>"
                   for n, a, b in zip(classes, c.per_class_a, c.per_class_b))
    sections = [f"<h2>Compared with a second checkpoint (B)</h2><p>A {c.acc_a:.2%}, B {c.acc_b:.2%}: only A is "
                f"right on {len(c.only_a)} test images, only B on {len(c.only_b)}.</p><table><tr><th>class</th>"
                f"<th>A</th><th>B</th><th>B - A (points)</th></tr>{rows}</table>"]
    for name, idx in (("only_a", c.only_a), ("only_b", c.only_b)):
        shown = idx[:count]
        if not len(shown):
            continue
        captions = [f"{classes[test.labels[i]]}: A {classes[test.preds[i]]}, B {classes[other_test.preds[i]]}"
                    for i in shown]
        title = "A right, B wrong" if name == "only_a" else "B right, A wrong"
        _cam_grid([(model, test.preds[shown]), (other, other_test.preds[shown])], test.images[shown], captions,
                  out / f"compare_{name}.png", f"{title}: image | A's {method} | B's {method}", layer, method)
        sections.append(f"<h3>{title}</h3><img src='compare_{name}.png' alt='{title}'>")
    return sections
