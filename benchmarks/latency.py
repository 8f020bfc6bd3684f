"""Inference latency of both networks: one image, and a batch of 500, in fp32 and bf16 autocast.

    python benchmarks/latency.py [--repeats 20]

Random weights (latency does not depend on them), eval mode, channels-last, uint8 input normalised inside the
model as everywhere in cifarlab. Median over `--repeats` calls after 3 warm-up calls; 2 threads here.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import time_ms

from cifarlab.module import ImageClassifier


def median_ms(fn, repeats: int) -> float:
    return float(np.median(time_ms(fn, repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    print("| network | precision | 1 image (ms) | batch of 500 (ms) | batch images/s |")
    print("|---|---|---:|---:|---:|")
    for arch in ("custom_resnet", "airbench"):
        model = ImageClassifier(arch=arch).eval()
        for precision in ("fp32", "bf16"):
            def run(x, precision=precision, model=model):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    return model(x)

            one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
            batch = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8)
            single = median_ms(lambda one=one: run(one), opts.repeats)
            many = median_ms(lambda batch=batch: run(batch), max(3, opts.repeats // 4))
            print(f"| {arch} | {precision} | {single:.1f} | {many:.0f} | {500 / many * 1000:.0f} |")


if __name__ == "__main__":
    main()
