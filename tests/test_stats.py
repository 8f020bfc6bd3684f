import numpy as np
import pytest

from cifarlab.stats import cached_channel_stats, channel_stats


def test_channel_stats_known_values():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[0, ..., 0] = 255  # red: half the pixels 1.0, half 0.0 -> mean 0.5, std 0.5
    images[:, :, :, 1] = 51  # green: constant 0.2 -> std 0
    images[:, :2, :, 2] = 255  # blue: half of every image 1.0
    mean, std = channel_stats(images, chunk=1)  # chunking must not change the result
    np.testing.assert_allclose(mean, [0.5, 0.2, 0.5], atol=1e-12)
    np.testing.assert_allclose(std, [0.5, 0.0, 0.5], atol=1e-7)


def test_channel_stats_matches_numpy_on_random_data():
    images = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    mean, std = channel_stats(images, chunk=5)
    x = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-7)


def test_channel_stats_rejects_bad_shape():
    with pytest.raises(ValueError, match="N, H, W, 3"):
        channel_stats(np.zeros((4, 4, 3), dtype=np.uint8))


def test_cached_stats_are_reused(tmp_path):
    images = np.full((3, 4, 4, 3), 128, dtype=np.uint8)
    cache = tmp_path / "stats-abc.json"
    first = cached_channel_stats(images, cache)
    assert cache.exists()
    # A different array under the same cache file returns the cached numbers: the key guards staleness.
    second = cached_channel_stats(np.zeros_like(images), cache)
    assert first == second
