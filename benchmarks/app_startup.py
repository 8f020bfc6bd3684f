"""How soon `cifarlab app` answers and each data tab is ready: cold (the checkpoint's caches removed) and warm.

    python benchmarks/app_startup.py --ckpt RUN/checkpoints/last.ckpt --data.root DIR [--runs cold warm] [--port 7871]
        [--page_repeats 5]

Starts `cifarlab app` as its own process, as a user would, and measures from the moment the command starts:
the first HTTP answer of the page (``GET /``), the first ``/classify`` answer, then, polling ``/status``, when each
background step is ready (the test set, its predictions, label issues, features, the map, the outlier scores,
the duplicate searches) and so when each data tab can fill itself. ``cold`` removes this checkpoint's cached
predictions, features, map, outlier scores and duplicate searches from the data's cache folder first (the decoded
images stay: they are decoded once per data set, not per checkpoint); ``warm`` runs right after with every cache in
place. A ``last.ckpt`` whose weights ``cifarlab fit`` tested reuses fit's ``test_predictions.npz`` in both.
``--page_repeats N`` then starts the app N more times and times the first page alone (median, min, max): its
seconds vary by a second from start to start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TABS = {"Mistakes, Correct, Confusion matrix": "test", "Likely mislabeled": "issues",
        "Embedding map": "map", "Unusual images": "outliers", "Near-duplicates": "duplicates"}


def cpu_line() -> str:
    """``lscpu``'s model name and the flags that matter for speed."""
    from cifarlab.precision import cpu_info

    model, flags = cpu_info()
    key = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile") if f in (flags or ())]
    return f"CPU: {model}; speed flags: {' '.join(key) or 'none of avx2/avx512/amx'}; cores: {os.cpu_count()}"


def checkpoint_caches(ckpt: Path, cache_dir: Path) -> list[Path]:
    """The files the app caches for this checkpoint in the data's cache folder."""
    from cifarlab.files import file_key

    key = file_key(ckpt)
    return [p for p in cache_dir.glob(f"*{key}*") if p.is_file()]


def wait_http(url: str, deadline: float, server: subprocess.Popen) -> float:
    """Seconds (``time.monotonic``) when ``url`` first answers 200."""
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the app exited ({server.returncode}): {server.stderr.read().decode()[-1500:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic()
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer in time")


def one_run(opts, label: str, port: int) -> dict[str, float]:
    from gradio_client import Client, handle_file

    cmd = [sys.executable, "-m", "cifarlab", "app", "--ckpt", str(opts.ckpt), "--data.root", opts.root,
           "--port", str(port), "--projection", opts.projection]
    start = time.monotonic()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/"
        times = {"page": wait_http(url, start + opts.timeout, server) - start}
        client = Client(url, verbose=False)
        image = next(p for p in sorted((Path(opts.root) / "test").rglob("*")) if p.is_file())
        client.predict(handle_file(str(image)), 3, 0.5, None, "Grad-CAM", api_name="/classify")
        times["classify"] = time.monotonic() - start
        seen: dict[str, float] = {}
        while time.monotonic() < start + opts.timeout:
            status = client.predict(api_name="/status")
            for key, step in status.items():
                if step["state"] in ("ready", "failed") and key not in seen:
                    seen[key] = time.monotonic() - start
                    if step["state"] == "failed":
                        raise SystemExit(f"{step['what']} failed: {step['error']}")
            if len(seen) == len(status):
                break
            time.sleep(0.2)
        times.update(seen)
    finally:
        server.terminate()
        server.wait(30)
    print(f"{label:>5}: page {times['page']:.1f} s, /classify {times['classify']:.1f} s; ready: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in seen.items()), flush=True)
    return times


def page_times(opts, port: int) -> list[float]:
    """Seconds from the command's start to the page's first answer, ``opts.page_repeats`` times."""
    cmd = [sys.executable, "-m", "cifarlab", "app", "--ckpt", str(opts.ckpt), "--data.root", opts.root,
           "--port", str(port)]
    times = []
    for _ in range(opts.page_repeats):
        start = time.monotonic()
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            times.append(wait_http(f"http://127.0.0.1:{port}/", start + opts.timeout, server) - start)
        finally:
            server.terminate()
            server.wait(30)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--runs", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    parser.add_argument("--port", type=int, default=7871, help="the first run's port; each run takes the next one")
    parser.add_argument("--projection", default="tsne", choices=["tsne", "pca"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for one run")
    parser.add_argument("--page_repeats", type=int, default=0, help="more starts that time the first page alone")
    opts = parser.parse_args()
    if not opts.ckpt.is_file() or not Path(opts.root, "test").is_dir():
        raise SystemExit("--ckpt must be a checkpoint file and --data.root an ImageFolder root with test/")
    cache_dir = Path(opts.root) / ".cifarlab-cache"
    print(cpu_line())
    print(f"checkpoint {opts.ckpt}, data {opts.root}, projection {opts.projection}")
    results = {}
    for i, label in enumerate(opts.runs):
        if label == "cold":
            for path in checkpoint_caches(opts.ckpt, cache_dir):
                path.unlink()
        results[label] = one_run(opts, label, opts.port + i)
    print("\n| run | first page | first /classify | " + " | ".join(TABS) + " |")
    print("|---|---|---|" + "---|" * len(TABS))
    for label, times in results.items():
        tabs = [f"{times[TABS[t]]:.1f} s" for t in TABS]
        print(f"| {label} | {times['page']:.1f} s | {times['classify']:.1f} s | " + " | ".join(tabs) + " |")
    if opts.page_repeats:
        pages = page_times(opts, opts.port + len(opts.runs))
        print(f"\nfirst page over {len(pages)} more starts: median {statistics.median(pages):.1f} s, "
              f"min {min(pages):.1f} s, max {max(pages):.1f} s ({', '.join(f'{t:.1f}' for t in pages)})")


if __name__ == "__main__":
    main()
