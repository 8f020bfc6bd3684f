"""The data audit on synthetic sets where the answer is known: flipped labels, planted duplicates, two runs."""

import numpy as np
import pytest
import torch

from cifarlab import audit, precision
from cifarlab.errors import CifarlabError


def noisy_probs(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Out-of-sample probabilities of a decent model (~70-95% on the true class), rows summing to 1."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), len(labels)) * 0.3
    probs[np.arange(len(labels)), labels] += rng.uniform(0.4, 0.7, len(labels))
    return probs / probs.sum(1, keepdims=True)


def test_cleanlab_ranks_flipped_labels_first():
    rng = np.random.default_rng(0)
    k, n = 5, 1000
    truth = rng.integers(0, k, n)
    probs = noisy_probs(truth, k)  # the model saw the true classes
    flipped = rng.choice(n, 30, replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + rng.integers(1, k, 30)) % k  # a wrong label, never the true one
    issues = audit.label_issues(given, probs)
    # Confident learning is conservative: it flags most flipped images and no clean one.
    assert set(issues.flagged) <= set(flipped) and len(issues.flagged) >= 25
    assert np.all(np.diff(issues.quality[issues.flagged]) >= 0)  # most likely mislabeled first
    assert set(np.argsort(issues.quality)[:30]) == set(flipped)  # the scores rank every flipped image first
    assert np.all(issues.suggested[flipped] == truth[flipped])


def test_cleanlab_with_a_missing_class_still_ranks_disagreements():
    labels = np.array([0, 0, 1, 1, 1])  # class 2 has no image: cleanlab's filter needs every class
    probs = np.array([[.9, .05, .05], [.1, .8, .1], [.1, .8, .1], [.2, .7, .1], [.7, .2, .1]])
    issues = audit.label_issues(labels, probs)
    assert list(issues.flagged) == [1, 4]  # the two disagreements, least likely given label (0.1, 0.2) first


def test_planted_duplicates_are_found_and_others_are_not():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    planted = np.arange(0, 60, 6)  # 10 test images are re-encoded copies of training images
    sources = rng.choice(400, len(planted), replace=False)
    for i, j in zip(planted, sources):
        copy = train[j].astype(np.int16) * 0.9 + 12 + rng.normal(0, 4, (32, 32, 3))  # darker, noisier copy
        test[i] = np.clip(copy, 0, 255).astype(np.uint8)
    # Features: here the pixels themselves, so the search's candidate step is exercised without a network.
    feats = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    nearest, similarity = audit.match_duplicates(test, train, feats(test), feats(train))
    assert np.array_equal(nearest[planted], sources)
    assert np.all(similarity[planted] >= audit.DUPLICATE_SIMILARITY)
    others = np.setdiff1d(np.arange(60), planted)
    assert np.all(similarity[others] < 0.5)


def test_nearest_neighbours_is_exact_and_sorted():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    query = rng.normal(size=(40, 16)).astype(np.float32)
    index, sim = audit.nearest_neighbours(query, base, k=3, chunk=7)  # several chunks
    centred = base - base.mean(0)
    b = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    q = query - base.mean(0)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    expected = np.argsort(-(q @ b.T), axis=1)[:, :3]
    assert np.array_equal(index, expected)
    assert np.all(np.diff(sim, axis=1) <= 0)


def test_compare_runs_splits_fixes_and_breakages():
    labels = np.array([0, 1, 2, 0, 1])
    a = np.eye(3)[[0, 1, 0, 1, 1]] * 0.8 + 0.2 / 3  # right on 0, 1, 4
    b = np.eye(3)[[0, 0, 2, 0, 1]] * 0.8 + 0.2 / 3  # right on 0, 2, 3, 4
    c = audit.compare_runs(a, b, labels, ["x", "y", "z"], ["x", "y", "z"])
    assert list(c.only_a) == [1]
    assert sorted(c.only_b) == [2, 3]
    assert c.acc_a == pytest.approx(0.6) and c.acc_b == pytest.approx(0.8)
    assert np.allclose(c.per_class_b - c.per_class_a, [0.5, -0.5, 1.0])
    with pytest.raises(CifarlabError, match="different classes"):
        audit.compare_runs(a, b, labels, ["x", "y", "z"], ["x", "y", "w"])


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_projection_keeps_clusters_apart(method):
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 10, (3, 32))
    labels = np.repeat(np.arange(3), 40)
    points = audit.project_2d((centres[labels] + rng.normal(0, 1, (120, 32))).astype(np.float32), method)
    assert points.shape == (120, 2)
    means = np.stack([points[labels == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(points[labels == c] - means[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(means[i] - means[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 2 * spread


def test_features_are_the_head_input_and_cached(smoke_run, tmp_path):
    from cifarlab.checkpoint import load_classifier

    root, _, ckpt = smoke_run
    model = load_classifier(ckpt)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    feats = audit.penultimate_features(model, images, batch_size=7)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad(), precision.autocast(model.device):  # the features' precision (bf16 where native)
        logits = model(x).float()
        from_features = model.net.fc(torch.from_numpy(feats)).float() * getattr(model.net, "logit_scale", 1.0)
    assert torch.allclose(from_features, logits, atol=1e-4 + 1e-2 * logits.abs().max().item())
    train = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)

    def audit_once():
        test_feats = audit.cached_features(model, ckpt, images, "test", tmp_path)
        train_feats = audit.cached_features(model, ckpt, train, "train", tmp_path)
        key = audit.features_key(model, ckpt)
        map2d = audit.cached_map(test_feats, key, "pca", tmp_path)
        return test_feats, map2d, audit.cached_duplicates(images, train, test_feats, train_feats, key, tmp_path)

    first = audit_once()
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.npz")) == ["copies", "features", "features",
                                                                            "map"]
    assert np.allclose(first[0], feats, atol=1e-2 * np.abs(feats).max())  # cached as float16
    again = audit_once()
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[2][0], again[2][0])
    assert first[2][0].shape == (30,) and first[1].shape == (30, 2)


def test_outlier_scores_rank_images_unlike_the_training_set_lowest():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 32)) * 4
    train = (centres[rng.integers(0, 3, 300)] + rng.normal(0, 1, (300, 32))).astype(np.float32)
    typical = (centres[rng.integers(0, 3, 40)] + rng.normal(0, 1, (40, 32))).astype(np.float32)
    odd = rng.normal(0, 1, (4, 32)).astype(np.float32) * 4 + 12  # far from every class
    train_scores, test_scores = audit.outlier_scores(train, np.concatenate([typical, odd]))
    assert train_scores.shape == (300,) and test_scores.shape == (44,)
    assert set(np.argsort(test_scores)[:4]) == {40, 41, 42, 43}
    assert ((test_scores >= 0) & (test_scores <= 1)).all()
    with pytest.raises(CifarlabError, match="at least 2 training images"):
        audit.outlier_scores(train[:1], typical)


def test_outlier_scores_equal_cleanlabs_out_of_distribution(monkeypatch):
    """The fast neighbour search feeds cleanlab's own score functions: the result must stay OutOfDistribution's."""
    from cleanlab.outlier import OutOfDistribution

    monkeypatch.setattr(audit, "OUTLIER_BATCH", 64)  # several batches: each leaves its own rows out
    rng = np.random.default_rng(3)
    train = rng.normal(0, 1, (700, 24)).astype(np.float32) + 0.5
    train[650] = train[3]  # an exact copy: its nearest neighbour is at distance 0
    test = rng.normal(0, 1.5, (90, 24)).astype(np.float32) + 0.5
    ours_train, ours_test = audit.outlier_scores(train, test)
    centred = train - train.mean(0, keepdims=True, dtype=np.float64).astype(np.float32)
    ood = OutOfDistribution(params={"k": audit.OUTLIER_NEIGHBOURS})
    assert np.allclose(ours_train, ood.fit_score(features=centred, verbose=False), atol=1e-5)
    assert np.allclose(ours_test, ood.score(features=test - (train - centred)[0]), atol=1e-5)


def test_duplicates_within_the_test_set_pair_copies_and_never_an_image_with_itself():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    images[7] = np.clip(images[2].astype(int) + 6, 0, 255)  # image 2 again, brighter
    features = rng.normal(0, 1, (12, 16)).astype(np.float32)
    features[7] = features[2] + 0.01  # the network sees them alike too
    nearest, similarity = audit.match_duplicates(images, None, features, None)
    assert (nearest != np.arange(12)).all()
    assert nearest[2] == 7 and nearest[7] == 2 and similarity[2] > 0.95
    assert (np.delete(similarity, [2, 7]) < 0.5).all()
