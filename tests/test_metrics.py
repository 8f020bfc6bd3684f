"""The confusion matrix every front end shows matches torchmetrics', which training logs."""

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from cifarlab.metrics import class_accuracy, confusion_matrix


def test_confusion_matrix_equals_torchmetrics():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    preds[:100] = labels[:100]  # some diagonal mass
    expected = multiclass_confusion_matrix(torch.from_numpy(preds), torch.from_numpy(labels), 7).numpy()
    got = confusion_matrix(preds, labels, 7)
    assert got.dtype == np.int64 and got.shape == (7, 7)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(class_accuracy(got), expected.diagonal() / expected.sum(1))


def test_confusion_matrix_of_nothing_is_zeros():
    assert not confusion_matrix(np.zeros(0, np.int64), np.zeros(0, np.int64), 3).any()
