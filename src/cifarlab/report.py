"""``cifarlab report``: one self-contained HTML folder for a checkpoint: curves, LR finder, confusion matrix, the most
confidently wrong test images with their CAMs, likely label errors, near-duplicates, the embedding map and, with a
second checkpoint, the two compared. Each section draws a ``views.View`` (the same the app shows) and says on the
terminal what it is doing.
"""

from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

import numpy as np

from cifarlab import views
from cifarlab.audit import DUPLICATE_SIMILARITY, DataAudit, check_same_classes, compare_runs, load_ensemble
from cifarlab.checkpoint import load_classifier
from cifarlab.inference import eval_data, predict_test_set
from cifarlab.plots import plot_confusion, plot_curves, plot_embedding, save_image_grid
from cifarlab.runs import Run

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
         "td,th{padding:2px 12px;text-align:left}")


class Progress:
    """``report [i/n] what`` on stdout as each section starts, and the total time at the end."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        print(f"report [{self.done}/{self.total}] {what}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _grid(view: views.View, out: Path, name: str, title: str, cols: int) -> list[str]:
    """The view's summary, and its panels as a captioned grid ``name``.png (when there are any)."""
    parts = [f"<p>{html.escape(view.summary)}</p>"]
    if view.panels:
        save_image_grid(np.stack(view.panels), view.captions, out / f"{name}.png", cols=cols, title=title)
        parts.append(f"<img src='{name}.png' alt='{html.escape(title)}'>")
    return parts


def run_report(ckpt: str | Path, data_root: str | None = None, source: str = "auto", out: str | Path | None = None,
               count: int = 32, compare: str | Path | None = None, dup_threshold: float = DUPLICATE_SIMILARITY,
               projection: str = "tsne", layer: str | None = None, method: str = "Grad-CAM",
               ensemble: list[str | Path] = ()) -> Path:
    """Write the report folder (default ``<run dir>/report``) and return its ``index.html``."""
    ckpt = Path(ckpt)
    model = load_classifier(ckpt)
    other = load_classifier(compare) if compare else None
    if other is not None:  # before any slow work: a wrong pair fails at once
        check_same_classes(list(model.class_names), list(other.class_names), f"--ckpt {ckpt}", f"--compare {compare}")
    members = load_ensemble(list(ensemble), list(model.class_names), ckpt)
    run = Run.of_checkpoint(ckpt)
    out = Path(out) if out else run.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    classes = list(model.class_names)
    cam = views.CamSettings(layer=layer, method=method, size=64)
    step = Progress(8 + (other is not None))

    step("the test set and its predictions")
    dm = eval_data(model, data_root, source)
    test = predict_test_set(model, ckpt, dm)
    sections = []

    step("training curves, LR range test and the confusion matrix")
    curves = run.dir / "curves.png"
    if curves.exists():
        shutil.copy(curves, out / "curves.png")
    elif (run.dir / "metrics.csv").exists():
        plot_curves(run.dir / "metrics.csv", out / "curves.png")
    if (out / "curves.png").exists():
        sections.append("<h2>Training curves</h2><img src='curves.png' alt='loss and accuracy per epoch'>")
    if run.lr_find_plot is not None:
        shutil.copy(run.lr_find_plot, out / "lr_find.png")
        sections.append("<h2>LR range test</h2><img src='lr_find.png' alt='LR finder'>")
    cm = test.confusion_matrix()
    plot_confusion(cm, classes, out / "confusion_matrix.png")
    sections.append(f"<h2>Test set: {cm.diagonal().sum() / max(cm.sum(), 1):.2%} of {int(cm.sum())} images</h2>"
                    "<img src='confusion_matrix.png' alt='confusion matrix'>"
                    + _table(["class", "accuracy", "images"], views.per_class_rows(cm, classes)))

    step(f"the {count} most confidently wrong test images, with their CAMs")
    view = views.predictions_view(model, test, "mistakes", count=count, cam=cam)
    sections += ["<h2>Most confidently wrong</h2>",
                 *_grid(view, out, "mistakes", f"Most confidently wrong: {method} of the prediction", cols=6)]

    audit = DataAudit(model, ckpt, test, dm, projection, ensemble=members)
    for _, what, run_step in audit.steps():
        step(what)
        run_step(None)
    for split in audit.issues:
        view = views.label_issues_view(model, audit, split, count=count, cam=cam)
        sections += [f"<h2>Likely mislabeled {split} images (cleanlab)</h2>",
                     *_grid(view, out, f"mislabeled_{split}", f"image | {method}: given label | suggested label", 4)]
    view = views.duplicates_view(audit, dup_threshold, count, size=64)
    sections += ["<h2>Near-duplicates of training images in the test set</h2>",
                 *_grid(view, out, "near_duplicates", "test image | its near-duplicate in the training set", 4)]
    view = views.test_pairs_view(audit, dup_threshold, count, size=64)
    sections += ["<h2>Near-duplicates within the test set</h2>",
                 *_grid(view, out, "test_duplicates", "test image | its near-duplicate in the test set", 4)]
    for split in ("test", "train"):
        view = views.outliers_view(audit, split, count=count, size=64)
        sections += [f"<h2>Unusual {split} images (images of no class?)</h2>",
                     *_grid(view, out, f"outliers_{split}", f"the {split} images least like the training set", 8)]
    plot_embedding(audit.map2d, test.labels, classes, test.preds != test.labels, out / "embedding_map.png",
                   title="true class")
    sections.append("<h2>Embedding map of the test set</h2><p>Penultimate features in 2-D, coloured by true "
                    "class; mistakes ringed in black.</p><img src='embedding_map.png' alt='embedding map'>")

    if other is not None:
        step(f"the second checkpoint {compare}")
        other_test = predict_test_set(other, compare, dm)
        c = compare_runs(test.probs, other_test.probs, test.labels, classes, list(other.class_names))
        sections += ["<h2>Compared with a second checkpoint (B)</h2>",
                     _table(["class", "A", "B", "B - A (points)"], views.comparison_rows(c, classes))]
        for name, which in zip(("compare_only_a", "compare_only_b"), views.COMPARE_CHOICES):
            view = views.comparison_view(model, other, test, other_test, c, which, count, cam, str(ckpt), str(compare))
            sections += [f"<h3>{which}</h3>", *_grid(view, out, name, f"{which}: image | A's CAM | B's CAM", 4)]

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cifarlab report</title><style>{STYLE}</style>"
            f"</head><body><h1>cifarlab report</h1><p>Checkpoint <code>{html.escape(str(ckpt))}</code></p>"
            f"{''.join(sections)}</body></html>")
    (out / "index.html").write_text(page)
    print(f"report: {out / 'index.html'} ({step.elapsed():.0f} s)", flush=True)
    return out / "index.html"
