"""Drawings shared by the report, the app and the commands: confusion matrix, curves, embedding map, image grids.

Files only (matplotlib's Agg backend: no display needed). Every function takes arrays and a path; none computes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from cifarlab.metrics import class_accuracy


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only; never needs a display)."""
    import matplotlib  # ~0.5 s to import on 2 cores: loaded by the first drawing, not when the app's page starts

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # the same heavy optional import, after the backend is chosen

    return plt


def plot_confusion(confmat: np.ndarray, classes: list[str], path: Path, title: str = "Test confusion matrix") -> None:
    """Counts per (true, predicted) cell, with per-class accuracy on the y labels."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
