"""Training speed of both networks in fp32 and in bf16 autocast on this CPU, and the precision cifarlab picks.

    python benchmarks/precision.py [--batch_size 256] [--steps 3]

Forward + backward + SGD step on random channels-last batches, 2 threads, after one warm-up step; prints
images/s per network and precision, the ratio, the CPU's bf16 flags, and what ``cifarlab.precision`` picks (and its
probe measures) here. On CPUs without native bf16, bf16 autocast is emulated: that is why recipes leave
``trainer.precision`` to ``cifarlab.precision``.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from cifarlab.models import build_model
from cifarlab.precision import choose_precision, cpu_info, probe_bf16_speedup


def images_per_s(arch: str, bf16: bool, batch_size: int, steps: int) -> float:
    """Median training images/s of ``steps`` timed steps."""
    torch.manual_seed(0)
    net = build_model(arch, 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up oneDNN's kernel choice
            times.append(time.perf_counter() - start)
    return batch_size / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=["airbench", "custom_resnet"])
    opts = parser.parse_args()
    torch.set_num_threads(2)
    model, flags = cpu_info()
    bf16_flags = sorted(f for f in flags or [] if "bf16" in f) or "none"
    choice = choose_precision("cpu")
    print(f"CPU: {model} ({platform.machine()}), torch {torch.__version__}, bf16 flags: {bf16_flags}, "
          f"oneDNN says bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"cifarlab's probe: bf16 {probe_bf16_speedup():.2f}x fp32; cifarlab picks: {choice.precision} "
          f"({choice.reason})")
    print("| network | fp32 img/s | bf16 autocast img/s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for arch in opts.archs:
        fp32 = images_per_s(arch, False, opts.batch_size, opts.steps)
        bf16 = images_per_s(arch, True, opts.batch_size, opts.steps)
        print(f"| {arch} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
