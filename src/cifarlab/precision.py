"""The fastest numeric precision for the machine a run lands on, used when a run does not name one.

Recipes leave ``trainer.precision`` out, so the same YAML runs at its best on every machine:

* CUDA: ``bf16-mixed`` where the GPU computes bf16 natively (Ampere and newer), else ``16-mixed``.
* CPU: ``bf16-mixed`` only where it is measurably faster than fp32 here, else ``32-true``. The CPU's flags
  decide first: without AVX512-BF16 or AMX-BF16 (x86) oneDNN *emulates* bf16, far slower than fp32,
  although ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` still says True on any AVX-512 CPU. With
  those flags (or where flags cannot be read) a short probe times one conv forward + backward at
  the fast recipe's shapes in both precisions; its answer is cached per machine (CPU model, flags, threads,
  torch version) in ``~/.cache/cifarlab/precision-<key>.json``.
* Anything else (MPS, ...): ``32-true``.

``--trainer.precision`` always wins over this choice. Measurements: ``benchmarks/precision.py``,
docs/results.md ("Precision").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_DIR: Path | None = None  # default: $CIFARLAB_CACHE or ~/.cache/cifarlab (resolved when first needed)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags (Linux /proc/cpuinfo names) of bf16 in hardware
MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this factor in the probe: a tie is not worth bf16's rounding


@dataclass
class Choice:
    """A precision and the one-line reason a run prints with it."""

    precision: str
    reason: str


def cpu_info() -> tuple[str, set[str] | None]:
    """``(model name, flags)`` of this CPU from ``/proc/cpuinfo``; flags are ``None`` where it cannot be read
    (not Linux), and the model falls back to ``platform.processor()``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:  # x86 / aarch64
            flags = set(value.split())
    return model or platform.machine(), flags


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool | None:
    """Whether this CPU computes bf16 in hardware: True/False from its x86 flags, ``None`` when the flags do not
    tell (no /proc/cpuinfo, or not x86), in which case only a measurement can."""
    if flags is None:
        flags = cpu_info()[1]
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def probe_bf16_speedup(batch: int = 64, repeats: int = 5) -> float:
    """Training-speed ratio bf16 autocast / fp32 on this CPU: one 3x3 conv 256 -> 256 channels at 8x8
    (the fast recipe's third conv group), forward + backward, channels-last. The two precisions alternate
    and each keeps its fastest of ``repeats`` calls after a warm-up, so another busy process slows both
    rather than skewing the ratio. It stops early once bf16 is clearly slower (its cost and repeatability:
    docs/results.md, "Precision").
    """
    with torch.random.fork_rng(devices=[]):  # the run's seed (set before this) must not move
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 256, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().square().mean().backward()
        return time.perf_counter() - start

    best = {False: float("inf"), True: float("inf")}
    for bf16 in (False, True):
        step(bf16)  # oneDNN picks and builds its kernels on the first call
    for i in range(repeats):
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], step(bf16))
        if i >= 1 and best[True] > 2 * best[False]:  # emulated: no need to measure how slow exactly
            break
    return best[False] / best[True]


def _cache_file(model: str, flags: set[str] | None) -> Path | None:
    """Where this machine's probe result is kept; ``None`` when there is no home to keep it in."""
    try:
        folder = CACHE_DIR or Path(os.environ.get("CIFARLAB_CACHE", "~/.cache/cifarlab")).expanduser()
    except RuntimeError:  # no HOME and no passwd entry
        return None
    key = f"{model}|{sorted(flags or [])}|{torch.get_num_threads()}|{torch.__version__}|{platform.machine()}"
    return folder / f"precision-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def _read_cache(cache: Path | None) -> float | None:
    try:
        return float(json.loads(cache.read_text())["bf16_speedup"]) if cache else None
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or damaged: measure again
        return None


def _write_cache(cache: Path | None, model: str, speedup: float) -> None:
    if cache is None:
        return
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"cpu": model, "bf16_speedup": speedup, "threads": torch.get_num_threads(),
                                   "torch": torch.__version__}))
        os.replace(tmp, cache)
    except OSError:  # a read-only home: probe again next time
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def cpu_precision(use_cache: bool = True) -> Choice:
    """The precision for training on this CPU, with the reason (see the module docstring)."""
    model, flags = cpu_info()
    native = cpu_has_native_bf16(flags)
    if native is False:
        return Choice("32-true", f"{model} has no native bf16 (no {'/'.join(NATIVE_BF16_FLAGS)} flag): "
                                 "bf16 would be emulated, slower than fp32")
    cache = _cache_file(model, flags)
    speedup = _read_cache(cache) if use_cache else None
    source = f"cached probe {cache}"
    if speedup is None:
        speedup = probe_bf16_speedup()
        source = "probe"
        _write_cache(cache, model, speedup)
    flag_text = "native bf16 flags" if native else "CPU flags unknown"
    if speedup >= MIN_SPEEDUP:
        return Choice("bf16-mixed", f"{model}: {flag_text}, bf16 {speedup:.2f}x fp32 ({source})")
    return Choice("32-true", f"{model}: {flag_text}, but bf16 only {speedup:.2f}x fp32 ({source})")


def choose_precision(accelerator: str | None = "auto") -> Choice:
    """Lightning precision string and reason for ``accelerator`` (``auto``, ``cpu``, ``gpu``/``cuda``, ...)."""
    accelerator = str(accelerator or "auto").lower()
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.is_bf16_supported():
            return Choice("bf16-mixed", "the GPU computes bf16 natively")
        return Choice("16-mixed", "the GPU has no native bf16")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available())
    if not on_cpu:
        return Choice("32-true", f"accelerator {accelerator}: no mixed precision chosen for it")
    return cpu_precision()


def fastest_precision(accelerator: str | None = "auto") -> str:
    """Lightning precision string for ``accelerator`` (see ``choose_precision``)."""
    return choose_precision(accelerator).precision


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast to the precision ``choose_precision`` picks for ``device`` (none where that is fp32): for forward
    passes whose outputs tolerate bf16's rounding, such as features searched for neighbours."""
    device = torch.device(device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(choose_precision(device.type).precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
