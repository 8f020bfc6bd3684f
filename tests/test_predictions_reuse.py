"""The test set's predictions are computed once: a checkpoint file with the weights `fit` tested (``last.ckpt`` after
the tested epoch) reuses fit's ``test_predictions.npz``; other weights are predicted and cached next to the data."""

import shutil

import numpy as np
import torch

from cifarlab.checkpoint import load_classifier
from cifarlab.inference import eval_data, predict_test_set


def test_a_copy_of_the_tested_weights_reuses_fits_predictions_and_other_weights_do_not(smoke_run):
    root, run, best = smoke_run
    saved = np.load(run / "test_predictions.npz")
    copy = run / "checkpoints" / "copy-of-the-tested.ckpt"  # another file, the same weights (as last.ckpt can be)
    other = run / "checkpoints" / "other.ckpt"  # another file of the same run, other weights
    shutil.copy(best, copy)
    shutil.copy(best, other)
    try:
        model = load_classifier(copy)
        dm = eval_data(model, str(root))
        before = set(dm.cache_dir.glob("predictions-*.npz"))
        test = predict_test_set(model, copy, dm)
        assert set(dm.cache_dir.glob("predictions-*.npz")) == before  # nothing predicted, nothing cached
        assert np.array_equal(test.probs, saved["probs"].astype(np.float32))

        with torch.no_grad():  # other weights: fit's file is not theirs
            next(model.net.parameters()).add_(0.5)
        test = predict_test_set(model, other, dm)
        written = set(dm.cache_dir.glob("predictions-*.npz")) - before
        assert len(written) == 1
        with np.load(written.pop()) as z:
            assert np.allclose(z["probs"].astype(np.float32), test.probs, atol=1e-3)
    finally:
        copy.unlink()
        other.unlink()
