"""Selective TTA: test accuracy and time against ``--model.tta.confident_at``, on trained checkpoints.

    python benchmarks/selective_tta.py CKPT [CKPT ...] [--data.root DIR] [--thresholds 0.5 0.6 0.7 0.8]

For each checkpoint, the plain logits and the recipe's full TTA logits (``tta.level``, at least 2) of every test image
are computed once, in the precision cifarlab picks on this machine (as ``cifarlab test`` runs), and timed. A threshold
``t`` then gives each image its TTA logits when its plain top probability is below ``t`` (what ``tta.confident_at``
does, per image), else its plain ones: the accuracy, the share of images that got the views, and the time that
``cifarlab test`` would spend (the plain pass plus that share of the extra views' time).
"""

from __future__ import annotations

import argparse
import time

import torch

from cifarlab.checkpoint import load_classifier
from cifarlab.inference import eval_data
from cifarlab.precision import cpu_info, fastest_precision


def logits_and_time(model, images: torch.Tensor, batch_size: int, tta: bool) -> tuple[torch.Tensor, float]:
    """Logits of uint8 ``images`` ``(N, 3, 32, 32)``, plain or with the model's full TTA, and the seconds taken."""
    bf16 = fastest_precision("cpu") == "bf16-mixed"
    out = []
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in images.split(batch_size):
            out.append((model.tta_logits(x) if tta else model(x)).float())
    return torch.cat(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--data.root", dest="root", default=None, help="test data (default: the checkpoint's)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--batch_size", type=int, default=2000)
    opts = parser.parse_args()
    cpu, flags = cpu_info()
    print(f"CPU: {cpu}, bf16 flags: {sorted(f for f in flags or [] if 'bf16' in f) or 'none'}, "
          f"precision: {fastest_precision('cpu')}")
    for path in opts.ckpts:
        model = load_classifier(path).eval()
        model.hparams["tta"] = {**model.hparams["tta"], "level": max(2, model.tta.level), "confident_at": 1.0}
        dm = eval_data(model, opts.root)
        images, labels = dm.test_set.batch(range(len(dm.test_set)))
        plain, plain_s = logits_and_time(model, images, opts.batch_size, tta=False)
        full, full_s = logits_and_time(model, images, opts.batch_size, tta=True)
        confidence = plain.softmax(1).amax(1)

        def acc(logits: torch.Tensor, labels: torch.Tensor = labels) -> float:
            return (logits.argmax(1) == labels).float().mean().item()

        print(f"\n{path}\n| confident_at | images with TTA | test accuracy | test time (s) |\n|---|---:|---:|---:|")
        print(f"| (no TTA) | 0% | {acc(plain):.2%} | {plain_s:.1f} |")
        for t in sorted(opts.thresholds):
            unsure = confidence < t
            share = unsure.float().mean().item()
            mixed = torch.where(unsure[:, None], full, plain)
            print(f"| {t:g} | {share:.0%} | {acc(mixed):.2%} | {plain_s + share * max(0.0, full_s - plain_s):.1f} |")
        print(f"| 1 (all) | 100% | {acc(full):.2%} | {full_s:.1f} |")


if __name__ == "__main__":
    main()
