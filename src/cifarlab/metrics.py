"""Numbers from predictions: the confusion matrix, per-class accuracy, the test-metrics record."""

from __future__ import annotations

import numpy as np


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class."""
    # One bincount, equal to torchmetrics' (tests/test_metrics.py): importing torchmetrics would add ~3 s to the
    # start of the app, predict and report (it imports torchvision's models).
    cells = np.asarray(labels, np.int64) * num_classes + np.asarray(preds, np.int64)
    return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


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
