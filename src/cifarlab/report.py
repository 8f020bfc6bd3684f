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


def metrics_from_confusion(confmat: np.ndarray, classes: list[str], test_loss: float) -> dict:
    """``test_acc``, ``test_loss`` and per-class accuracy from a ``(K, K)`` confusion matrix (rows = truth)."""
    confmat = np.asarray(confmat, dtype=np.int64)
    per_class = confmat.diagonal() / np.maximum(confmat.sum(1), 1)
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
    acc = confmat.diagonal() / np.maximum(confmat.sum(1), 1)
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


def save_image_grid(images: np.ndarray, captions: list[str], path: Path, cols: int = 8, title: str = "") -> None:
    """``(N, 3, H, W)`` or ``(N, H, W, 3)`` uint8 images in a captioned grid, upscaled without smoothing."""
    images = np.asarray(images)
    if images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.65 * rows + (0.4 if title else 0)))
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
                 method: str = "Grad-CAM") -> Path:
    """A self-contained report folder: ``index.html`` and its PNGs (curves, LR finder, confusion matrix,
    per-class accuracy, the most-confidently-wrong test images with their CAMs). Returns the HTML path."""
    import html
    import shutil

    import torch

    from cifarlab import cam as cams

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(ckpt_path).resolve().parent.parent
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
    lr_plot = run_dir.parent / "lr_find" / "lr_find.png"
    if lr_plot.exists():
        shutil.copy(lr_plot, out / "lr_find.png")
        sections.append("<h2>LR range test</h2><img src='lr_find.png' alt='LR finder'>")
    acc = cm.diagonal().sum() / max(cm.sum(), 1)
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
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
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cifarlab report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
            "td,th{padding:2px 12px;text-align:left}</style></head><body><h1>cifarlab report</h1>"
            f"<p>Checkpoint <code>{html.escape(str(ckpt_path))}</code></p>{''.join(sections)}</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"
