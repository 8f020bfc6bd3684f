"""How long the data audit takes for one checkpoint on this CPU, step by step, and what it finds.

    python benchmarks/audit_speed.py --ckpt runs/fast/version_0/checkpoints/last.ckpt --data.root DIR

Times what the app and `cifarlab report` compute once per checkpoint (then cache): penultimate features of the test
set, its 2-D map (t-SNE and PCA), features of the training set, the near-duplicate searches (against the training
set and within the test set), cleanlab's label issues and the outlier scores. Features run in the precision the
audit picks (bf16 where it is native) and again in fp32, with how far the two disagree (the cosine between each
image's two feature vectors, centred); the outlier scores run as the audit computes them and through cleanlab's
``OutOfDistribution``, with the largest difference. Prints the counts it finds (flagged test images,
near-duplicates at the default threshold) with the accuracies. Nothing is read from or written to the cache.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from cleanlab.outlier import OutOfDistribution
from peer import cpu_line

from cifarlab import audit, precision
from cifarlab.checkpoint import load_classifier
from cifarlab.inference import eval_data, predict_test_set


def cleanlab_outliers(train_feats: np.ndarray, test_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``audit.outlier_scores`` through cleanlab's own ``OutOfDistribution`` (scikit-learn's neighbour search)."""
    mean = train_feats.mean(0, keepdims=True, dtype=np.float64).astype(np.float32)
    ood = OutOfDistribution(params={"k": audit.OUTLIER_NEIGHBOURS})
    return ood.fit_score(features=train_feats - mean, verbose=False), ood.score(features=test_feats - mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data.root", dest="root", required=True)
    opts = parser.parse_args()
    print(cpu_line().split("; all flags")[0], f"| torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = load_classifier(opts.ckpt)
    dm = eval_data(model, opts.root)
    test = predict_test_set(model, opts.ckpt, dm)
    train = dm.load_splits()["train"]
    seconds = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        seconds[name] = time.perf_counter() - start
        print(f"{name:<40} {seconds[name]:7.1f} s", flush=True)
        return out

    feats = timed(f"features, {len(test.images)} test images", audit.penultimate_features, model, test.images)
    exact = timed(f"features in fp32, {len(test.images)} test images", audit.penultimate_features, model,
                  test.images, audit.FEATURE_BATCH, None, None, True)
    cosine = (F.normalize(torch.from_numpy(feats - exact.mean(0)), dim=1)
              * F.normalize(torch.from_numpy(exact - exact.mean(0)), dim=1)).sum(1)
    print(f"features in {precision.choose_precision(str(model.device.type)).precision} against fp32: cosine min "
          f"{cosine.min():.5f}, median {cosine.median():.6f}")
    timed("2-D map, t-SNE", audit.project_2d, feats, "tsne")
    timed("2-D map, PCA", audit.project_2d, feats, "pca")
    train_feats = timed(f"features, {len(train.images)} training images", audit.penultimate_features, model,
                        train.images)
    nearest, sim = timed("near-duplicate search", audit.match_duplicates, test.images, train.images, feats,
                         train_feats)
    timed("near-duplicate search within the test set", audit.match_duplicates, test.images, None, feats, None)
    issues = timed("cleanlab label issues (test)", audit.label_issues, test.labels, test.probs)
    ours = timed("outlier scores", audit.outlier_scores, train_feats, feats)
    theirs = timed("outlier scores, cleanlab OutOfDistribution", cleanlab_outliers, train_feats, feats)
    print(f"outlier scores against OutOfDistribution's: largest difference "
          f"{max(np.abs(a - b).max() for a, b in zip(ours, theirs)):.1e}")
    first = seconds[f"features, {len(test.images)} test images"] + seconds["2-D map, t-SNE"]
    audit_steps = sum(v for k, v in seconds.items() if "fp32" not in k and "OutOfDistribution" not in k
                      and "PCA" not in k)
    print(f"test features + t-SNE map: {first:.1f} s (goal < 60 s); everything the audit runs: {audit_steps:.1f} s")
    keep = np.ones(len(test.labels), bool)
    keep[issues.flagged] = False
    acc = lambda keep: audit.accuracy(test.preds, test.labels, keep)  # noqa: E731
    flagged = len(issues.flagged)
    print(f"test accuracy {acc(None):.2%}; cleanlab flags {flagged} ({flagged / len(keep):.1%}), accuracy without "
          f"them {acc(keep):.2%}")
    dups = sim >= audit.DUPLICATE_SIMILARITY
    print(f"near-duplicates at similarity >= {audit.DUPLICATE_SIMILARITY}: {int(dups.sum())} test images "
          f"({dups.mean():.1%}); accuracy on the de-duplicated test set {acc(~dups):.2%}, "
          f"on the duplicates {acc(dups):.2%}; labels differ in "
          f"{int((train.labels[nearest[dups]] != test.labels[dups]).sum())} pairs")


if __name__ == "__main__":
    main()
