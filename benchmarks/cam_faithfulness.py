"""Is the CAM faithful? Confidence drop when the CAM's top 20% pixels are removed vs 20% random pixels.

    python benchmarks/cam_faithfulness.py --ckpt runs/seed/version_0/checkpoints/last.ckpt --data.root DIR [--n 1000]

For the first N test images (stratified by order), per target layer and CAM method: the mean drop of the
predicted class's softmax probability under pytorch-grad-cam's ROAD (removed pixels imputed from neighbours),
for the CAM's most relevant 20% and for 20% random pixels, and their ratio. Goal: ratio >= 2.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cifarlab import cam as cams
from cifarlab.checkpoint import load_classifier
from cifarlab.inference import eval_data, predict_test_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data.root", dest="root", default=None)
    parser.add_argument("--n", type=int, default=1000, help="test images (every 10000/n-th)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--layers", nargs="*", default=["layer3 (4x4)", "layer2 (8x8)"])
    parser.add_argument("--methods", nargs="*", default=["Grad-CAM", "Grad-CAM++"])
    opts = parser.parse_args()
    model = load_classifier(opts.ckpt)
    test = predict_test_set(model, opts.ckpt, eval_data(model, opts.root))
    idx = np.linspace(0, len(test.labels) - 1, opts.n).round().astype(int)
    layers = cams.target_layers(model.net)
    print(f"{len(idx)} test images, checkpoint {opts.ckpt}, accuracy on them "
          f"{(test.preds[idx] == test.labels[idx]).mean():.2%}")
    print("| layer | method | drop, CAM top 20% removed | drop, 20% random removed | ratio | s |")
    print("|---|---|---:|---:|---:|---:|")
    for layer in opts.layers:
        for method in opts.methods:
            start = time.perf_counter()
            cam_drops, random_drops = [], []
            for b in range(0, len(idx), opts.batch):
                sel = idx[b:b + opts.batch]
                x = torch.from_numpy(test.images[sel]).permute(0, 3, 1, 2).contiguous()
                preds = test.preds[sel].tolist()
                maps = cams.compute_cams(model, x, layers[layer], method, preds)
                c, r = cams.faithfulness(model, x, maps, preds)
                cam_drops.append(c)
                random_drops.append(r)
            c, r = np.concatenate(cam_drops).mean(), np.concatenate(random_drops).mean()
            print(f"| {layer} | {method} | {c:.4f} | {r:.4f} | {c / max(r, 1e-9):.2f}x | "
                  f"{time.perf_counter() - start:.0f} |")


if __name__ == "__main__":
    main()
