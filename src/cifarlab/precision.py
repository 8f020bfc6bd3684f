"""The fastest numeric precision for the machine a run lands on, used when a run does not name one.

Recipes leave ``trainer.precision`` out, so the same YAML runs at its best on every machine:

* CUDA: ``bf16-mixed`` where the GPU computes bf16 natively (Ampere and newer), else ``16-mixed``.
* CPU with native bf16 (AVX512-BF16 or AMX, as oneDNN reports it): ``bf16-mixed``, about 2x fp32 there.
* Any other CPU (e.g. AVX2 only): ``32-true``. bf16 autocast is emulated there and an order of magnitude
  slower than fp32 (``benchmarks/precision.py``; docs/benchmarks.md).
* Anything else (MPS, ...): ``32-true``.

``--trainer.precision`` always wins over this choice.
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 kernels natively on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def fastest_precision(accelerator: str | None = "auto") -> str:
    """Lightning precision string for ``accelerator`` (``auto``, ``cpu``, ``gpu``/``cuda``, ...)."""
    accelerator = str(accelerator or "auto").lower()
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available())
    return "bf16-mixed" if on_cpu and cpu_has_native_bf16() else "32-true"
