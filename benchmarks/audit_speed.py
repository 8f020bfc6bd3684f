"""How long the data audit takes for one checkpoint on this CPU, step by step, and what it finds.

    python benchmarks/audit_speed.py --ckpt runs/fast/version_0/checkpoints/last.ckpt --data.root DIR

Times what the app and `cifarlab report` compute once per checkpoint (then cache): penultimate features of the test
set, its 2-D map (t-SNE and PCA), features of the training set, the near-duplicate search, cleanlab's label issues.
Prints the counts it finds (flagged test images, near-duplicates at the default threshold) with the accuracies.
Nothing is read from or written to the cache.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from peer import cpu_line

from cifarlab import audit
from cifarlab.checkpoint import load_classifier
from cifarlab.inference import eval_data, predict_test_set


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
    timed("2-D map, t-SNE", audit.project_2d, feats, "tsne")
    timed("2-D map, PCA", audit.project_2d, feats, "pca")
    train_feats = timed(f"features, {len(train.images)} training images", audit.penultimate_features, model,
                        train.images)
    nearest, sim = timed("near-duplicate search", audit.match_duplicates, test.images, train.images, feats,
                         train_feats)
    issues = timed("cleanlab label issues (test)", audit.label_issues, test.labels, test.probs)
    first = seconds[f"features, {len(test.images)} test images"] + seconds["2-D map, t-SNE"]
    print(f"test features + t-SNE map: {first:.1f} s (goal < 60 s); everything: {sum(seconds.values()):.1f} s")
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
