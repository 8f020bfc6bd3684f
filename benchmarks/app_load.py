"""The app under load: N concurrent gradio_client requests to /classify, each checked against the model.

    python benchmarks/app_load.py --ckpt RUN/checkpoints/last.ckpt --data.root DIR [--requests 50] [--waves 2]

Serves the app in this process on 127.0.0.1 (as `cifarlab app` does), submits N requests at once through one
gradio_client (each a different test image), waits for all, and checks every answer's top class against the
model called directly on the same file. Reports errors, wrong answers, wall time, per-request latency
(p50/p95/max, queueing included: the app runs one request at a time on purpose) and the server's resident
memory after each wave; a second wave shows whether memory keeps growing (it should not).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402


def rss_mb() -> float:
    """Resident memory of this process (the server runs in it), MB; Linux only (nan elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pick_images(root: Path, n: int) -> list[Path]:
    """``n`` test images taken round-robin over the classes (so answers differ from request to request)."""
    per_class = [sorted(p for p in d.iterdir() if p.is_file()) for d in sorted((root / "test").iterdir()) if d.is_dir()]
    picked = [files[i % len(files)] for i in range(n) for files in [per_class[i % len(per_class)]]]
    return picked[:n]


def fire(client, app, images: list[Path], layer: str, method: str) -> dict:
    """Submit every request at once, wait for all; returns counts, latencies (s) and the wall time (s)."""
    from gradio_client import handle_file

    from cifarlab.inference import classify, decode_upload, model_input

    expected = [app.classes[int(classify(app.model, model_input(decode_upload(p)))[0].argmax())] for p in images]
    start = time.perf_counter()

    def one(path: Path):
        t0 = time.perf_counter()
        job = client.submit(handle_file(str(path)), 3, 0.5, layer, method, api_name="/classify")
        result = job.result(timeout=600)
        return result, time.perf_counter() - t0

    errors, wrong, latencies = [], 0, []
    with ThreadPoolExecutor(max_workers=len(images)) as pool:  # every request in flight at once
        futures = [pool.submit(one, p) for p in images]
        for fut, want in zip(futures, expected):
            try:
                (label, *_), seconds = fut.result()
            except Exception as err:  # any failure is counted and reported, not raised
                errors.append(f"{type(err).__name__}: {err}"[:200])
                continue
            latencies.append(seconds)
            wrong += label["label"] != want
    return {"errors": errors, "wrong": wrong, "answered": len(latencies), "latencies": latencies,
            "wall": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data.root", dest="root", required=True, help="ImageFolder root (its test/ images are sent)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--layer", default=None, help="CAM layer (default: the app's default)")
    parser.add_argument("--method", default="Grad-CAM")
    opts = parser.parse_args()

    from gradio_client import Client

    from cifarlab.app import CifarApp, launch

    app = CifarApp(opts.ckpt, opts.root)
    layer = opts.layer or list(app.layers)[-1]
    demo = launch(app, "127.0.0.1", None, block=False)
    try:
        client = Client(demo.local_url, verbose=False)
        images = pick_images(Path(opts.root), opts.requests)
        print(f"{opts.requests} concurrent /classify requests ({layer}, {opts.method}); server RSS at start "
              f"{rss_mb():.0f} MB")
        failed = False
        for wave in range(1, opts.waves + 1):
            r = fire(client, app, images, layer, opts.method)
            lat = np.array(r["latencies"]) * 1000 if r["latencies"] else np.array([np.nan])
            print(f"wave {wave}: answered {r['answered']}/{opts.requests}, errors {len(r['errors'])}, "
                  f"wrong {r['wrong']}, wall {r['wall']:.1f} s ({opts.requests / r['wall']:.1f} req/s), latency "
                  f"p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms, max {lat.max():.0f} ms; "
                  f"server RSS {rss_mb():.0f} MB")
            for err in r["errors"][:5]:
                print(f"  error: {err}")
            failed |= bool(r["errors"]) or r["wrong"] > 0
    finally:
        demo.close()
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
