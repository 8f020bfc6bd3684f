import numpy as np
import pytest

from cifarlab.lr_find import BETA, debias, steepest_descent


def _lightning_smoothing(raw, beta=BETA):
    """What Lightning's _LRCallback reports for raw losses (global_step is k + 1 at point k)."""
    avg, out = 0.0, []
    for k, loss in enumerate(raw):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (k + 2)))
    return np.array(out)


def test_debias_recovers_a_flat_loss():
    raw = np.full(60, 2.3)
    reported = _lightning_smoothing(raw)
    assert reported[0] < 1.2  # the artefact: a constant loss reads as rising from ~1.2
    np.testing.assert_allclose(debias(reported), raw, rtol=1e-12)


def test_steepest_descent_is_measured_against_log_lr():
    lrs = np.logspace(-7, 1, 200)
    # Flat, then a descent centred at 1e-3 (steepest there in log space), then divergence.
    loss = 2.3 - 1.0 / (1 + np.exp(-(np.log10(lrs) + 3) * 3)) + np.where(lrs > 1e-1, (np.log10(lrs) + 1) * 2, 0)
    loss[:15] += np.random.default_rng(0).normal(0, 0.02, 15)  # noise among tiny LRs must not win
    best = steepest_descent(lrs, loss)
    assert 3e-4 < lrs[best] < 3e-3


def test_steepest_descent_needs_points():
    with pytest.raises(ValueError):
        steepest_descent(np.logspace(-7, 1, 12), np.ones(12))
