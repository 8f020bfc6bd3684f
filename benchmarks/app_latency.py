"""Latency of the app's classify handler (decode + resize + classify + CAM + panels [+ faithfulness]) on this CPU.

    python benchmarks/app_latency.py --ckpt runs/seed/version_0/checkpoints/last.ckpt [--repeats 50] [--http]

Reports p50/p90 in milliseconds for a 32x32 upload and a 4032x3024 photo (JPEG), called in-process the way
the server calls it (no HTTP), with and without the faithfulness score; also batch-500 classification.

With ``--http`` it serves the app on 127.0.0.1 and times /classify of a small image end to end, as programs see it:
the REST API over one keep-alive connection (upload, call, result stream, the three panels downloaded), then
``gradio_client`` (with and without downloading the panels), next to the same handler called in-process.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

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
    parser.add_argument("--http", action="store_true", help="time /classify over HTTP (see above)")
    opts = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    app = CifarApp(opts.ckpt, data_root=None)
    if opts.layer is None:
        opts.layer = next(iter(app.layers))  # deepest first, whatever the network
    if opts.layer not in app.layers:
        raise SystemExit(f"--layer {opts.layer!r}: this checkpoint's layers are {', '.join(app.layers)}")
    if opts.http:
        return http_latency(app, opts)
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


def rest_classify(http, base: str, data: bytes, layer: str, method: str) -> dict:
    """/classify through Gradio's REST API on the ``httpx.Client`` ``http`` (one keep-alive connection): upload,
    call, read the result stream, download the three panels. Returns the top-k label output."""
    import json

    uploaded = http.post(f"{base}/gradio_api/upload", files={"files": ("image.png", data, "image/png")}).json()
    payload = {"data": [{"path": uploaded[0], "meta": {"_type": "gradio.FileData"}}, 3, 0.5, layer, method]}
    event = http.post(f"{base}/gradio_api/call/classify", json=payload).json()["event_id"]
    kind, result = None, None
    with http.stream("GET", f"{base}/gradio_api/call/classify/{event}") as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                if kind == "error":
                    raise RuntimeError(f"/classify failed: {line[5:].strip()}")
                result = json.loads(line[5:])
                break
    for panel in result[1:4]:
        assert len(http.get(panel["url"]).content) > 100
    return result[0]


def http_latency(app, opts) -> None:
    """Serve the app and time /classify of a 32x32 PNG: in-process, REST (keep-alive), gradio_client."""
    import os
    import tempfile

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import httpx
    from gradio_client import Client, handle_file

    from cifarlab.app import launch

    demo = launch(app, "127.0.0.1", None, block=False, prepare=False)  # Classify alone: no background work
    base = demo.local_url.rstrip("/")
    path = Path(tempfile.mkdtemp()) / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    args = (opts.layer, opts.method)
    print(f"threads: {torch.get_num_threads()}, checkpoint: {opts.ckpt}, CAM: {opts.method} on {opts.layer}; "
          f"/classify of a 32x32 PNG, top 3, with faithfulness, {opts.repeats} calls after 3 warm-up calls")
    try:
        rows = [("in-process handler (no HTTP)", lambda: app.classify_image(str(path), 3, 0.5, *args))]
        with httpx.Client(timeout=120) as http:
            rows.append(("REST API, keep-alive connection", lambda: rest_classify(http, base, data, *args)))
            client = Client(demo.local_url, verbose=False)
            lean = Client(demo.local_url, verbose=False, download_files=False)
            rows.append(("gradio_client, panels downloaded", lambda: client.predict(
                handle_file(str(path)), 3, 0.5, *args, api_name="/classify")))
            rows.append(("gradio_client, download_files=False", lambda: lean.predict(
                handle_file(str(path)), 3, 0.5, *args, api_name="/classify")))
            # Where the time goes: gradio_client's own cost on a function that does nothing, and one panel's
            # download on a new connection (as gradio_client does it) against a kept-alive one.
            echo = gr.Blocks()
            with echo:
                number = gr.Number()
                gr.Button().click(lambda x: x, number, number, api_name="echo")
            echo.queue().launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
            echo_client = Client(echo.local_url, verbose=False)
            rows.append(("gradio_client, a function returning its input", lambda: echo_client.predict(
                1, api_name="/echo")))
            panel = lean.predict(handle_file(str(path)), 3, 0.5, *args, api_name="/classify")[1]["url"]
            rows.append(("one panel download, new connection", lambda: httpx.get(panel).content))
            rows.append(("one panel download, kept-alive connection", lambda: http.get(panel).content))
            for name, fn in rows:
                p50, p90 = percentiles(fn, opts.repeats)
                print(f"{name:<46} p50 {p50:6.1f} ms, p90 {p90:6.1f} ms", flush=True)
            echo.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
