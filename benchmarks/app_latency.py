"""Latency of the app's classify handler (decode + resize + classify + CAM + panels [+ faithfulness]) on this CPU.

    python benchmarks/app_latency.py --ckpt runs/seed/version_0/checkpoints/last.ckpt [--repeats 50]

Reports p50/p90 in milliseconds for a 32x32 upload and a 4032x3024 photo (JPEG), called in-process the way
the server calls it (no HTTP), with and without the faithfulness score; also batch-500 classification.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image
from timing import time_ms

from cifarlab import cam as cams
from cifarlab.app import CifarApp
from cifarlab.inference import DECODE_MIN_SIZE, classify, decode_upload, model_input


def percentiles(fn, repeats: int) -> tuple[float, float]:
    times = time_ms(fn, repeats)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


def jpeg_bytes(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)  # photo-like: smooth, compressible
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--layer", default=None, help="a CAM layer as the app lists it (default: the deepest)")
    parser.add_argument("--method", default="Grad-CAM")
    opts = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    app = CifarApp(opts.ckpt, data_root=None)
    app.test = None  # latency only: no test set needed
    if opts.layer is None:
        opts.layer = next(iter(app.layers))  # deepest first, whatever the network
    if opts.layer not in app.layers:
        raise SystemExit(f"--layer {opts.layer!r}: this checkpoint's layers are {', '.join(app.layers)}")
    layer = app.layers[opts.layer]
    print(f"threads: {torch.get_num_threads()}, checkpoint: {opts.ckpt}, CAM: {opts.method} on {opts.layer}")
    for name, size in (("32x32", (32, 32)), ("4032x3024", (4032, 3024))):
        data = jpeg_bytes(size)

        def classify_and_cam(data=data):
            x = model_input(decode_upload(data, min_size=DECODE_MIN_SIZE))
            probs = classify(app.model, x)[0]
            pred = int(probs.argmax())
            maps = cams.compute_cams(app.model, x, layer, opts.method, [pred])
            img = x[0].permute(1, 2, 0).numpy()
            return cams.upscale(img, 224), cams.heatmap(maps[0], 224), cams.overlay(img, maps[0], 0.5, 224)

        def with_faithfulness(data=data):
            x = model_input(decode_upload(data, min_size=DECODE_MIN_SIZE))
            pred = int(classify(app.model, x)[0].argmax())
            maps = cams.compute_cams(app.model, x, layer, opts.method, [pred])
            cams.faithfulness(app.model, x, maps, [pred])

        p50, p90 = percentiles(classify_and_cam, opts.repeats)
        f50, f90 = percentiles(with_faithfulness, max(5, opts.repeats // 5))
        print(f"{name:>10} upload ({len(data) / 1024:.0f} KB): classify + CAM + panels p50 {p50:.1f} ms, "
              f"p90 {p90:.1f} ms; with faithfulness p50 {f50:.1f} ms, p90 {f90:.1f} ms")
    batch = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8)
    b50, _ = percentiles(lambda: classify(app.model, batch), 5)
    print(f"batch of 500 (fp32, no CAM): {b50:.0f} ms = {500 / b50 * 1000:.0f} images/s")


if __name__ == "__main__":
    main()
