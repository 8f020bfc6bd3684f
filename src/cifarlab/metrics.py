"""Numbers from predictions: the confusion matrix (torchmetrics), per-class accuracy, the test-metrics record."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class."""
    if len(labels) == 0:
        return np.zeros((num_classes, num_classes), np.int64)
    cm = multiclass_confusion_matrix(torch.as_tensor(np.asarray(preds)), torch.as_tensor(np.asarray(labels)),
                                     num_classes)
    return cm.numpy().astype(np.int64)


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
