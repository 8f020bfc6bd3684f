"""The app under load: N concurrent gradio_client requests to /classify, each checked against the model.

    python benchmarks/app_load.py --ckpt RUN/checkpoints/last.ckpt --data.root DIR [--requests 50] [--waves 2] [--same]

Starts `cifarlab app` as its own process on 127.0.0.1, submits N requests at once through one gradio_client
(each a different test image; with --same, all the same one, as when many people send one picture), waits for
all, and checks every answer's top class against the model called directly on the same file. Reports errors,
wrong answers, wall time, per-request latency (p50/p95/max, queueing included: the app runs one request at a
time on purpose) and the server process's resident memory after each wave; further waves show whether that
memory keeps growing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (default: this one), MB; Linux only (nan elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
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


def fire(client, model, images: list[Path], layer: str, method: str) -> dict:
    """Submit every request at once, wait for all; returns counts, latencies (s) and the wall time (s).

    Every answer's top class is checked against ``model`` (the app's checkpoint) called on the same file.
    """
    from gradio_client import handle_file

    from cifarlab.inference import classify, decode_upload, model_input

    expected = [model.class_names[int(classify(model, model_input(decode_upload(p)))[0].argmax())] for p in images]
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


def start_server(ckpt: str, root: str, port: int) -> subprocess.Popen:
    """``cifarlab app`` in its own process, as a user starts it; returns once it answers HTTP."""
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "cifarlab.cli", "app", "--ckpt", ckpt, "--data.root", root,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"cifarlab app exited with status {server.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("cifarlab app did not answer within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data.root", dest="root", required=True, help="ImageFolder root (its test/ images are sent)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--layer", default=None, help="CAM layer (default: the deepest, as in the app)")
    parser.add_argument("--method", default="Grad-CAM")
    parser.add_argument("--same", action="store_true",
                        help="send one test image in every request (identical outputs, served concurrently)")
    opts = parser.parse_args()

    from gradio_client import Client

    from cifarlab import cam as cams
    from cifarlab.checkpoint import load_classifier

    model = load_classifier(opts.ckpt)
    layer = opts.layer or next(iter(cams.target_layers(model.net)))  # the app's default
    server = start_server(opts.ckpt, opts.root, opts.port)
    try:
        client = Client(f"http://127.0.0.1:{opts.port}/", verbose=False)
        images = pick_images(Path(opts.root), 1 if opts.same else opts.requests)
        images = images * opts.requests if opts.same else images
        what = f"the same image ({images[0].name})" if opts.same else "different images"
        print(f"{opts.requests} concurrent /classify requests of {what} ({layer}, {opts.method}) to `cifarlab app` "
              f"(pid {server.pid}); its RSS before the first: {rss_mb(server.pid):.0f} MB")
        failed = False
        for wave in range(1, opts.waves + 1):
            r = fire(client, model, images, layer, opts.method)
            lat = np.array(r["latencies"]) * 1000 if r["latencies"] else np.array([np.nan])
            print(f"wave {wave}: answered {r['answered']}/{opts.requests}, errors {len(r['errors'])}, "
                  f"wrong {r['wrong']}, wall {r['wall']:.1f} s ({opts.requests / r['wall']:.1f} req/s), latency "
                  f"p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms, max {lat.max():.0f} ms; "
                  f"server RSS {rss_mb(server.pid):.0f} MB", flush=True)
            for err in r["errors"][:5]:
                print(f"  error: {err}")
            failed |= bool(r["errors"]) or r["wrong"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
