"""Ways to make the fast recipe's training step cheaper on a CPU, each timed against the step as it ships, side by
side in one process; and the whitening conv's bf16 output checked against fp64.

    python benchmarks/step_levers.py --data.root /tmp/cifar10-jpeg [--repeats 7] [--no_compile]

Builds the fast recipe as ``cifarlab fit --config fast`` does (airbench network, Muon, its batch, the precision
cifarlab picks for this CPU) and times ``training_step`` + backward + optimizer step on augmented training batches of
the real data (the whitening bias frozen, as in all but the recipe's first 6 steps), one copy of the model per kind:

* **as shipped**;
* **max-pool without indices, 4 maxima**: each conv group's 2x2 max-pool as the elementwise maximum of its four
  strided views (no int64 index tensor written in the forward and read in the backward);
* **max-pool without indices, amax**: the same as a reshape and ``amax`` over each 2x2 window;
* **torch.compile**: the network compiled by TorchInductor (``torch.compile(net)``, default mode); the seconds of its
  first step (the compilation) are reported apart.

The kinds run in turns, ``--repeats`` rounds after a warm-up round, so that a shared machine's slow spells fall on
all of them alike; each is reported by its median and as a ratio of the shipped step's.

The whitening check: the 2x2 whitening conv (initialised from 5,000 training images, as ``fit`` does) on 2,000
normalised test images, in fp32, under bf16 autocast (oneDNN's bf16 kernel), and in fp64 from bf16-rounded inputs and
weights, the result rounded to bf16 (what an exact bf16 kernel would give); each error relative to the fp64 result,
and oneDNN's against the exact bf16 one.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from steps import autocast_for, batches, fast_recipe, in_turns
from torch import nn


class MaxPoolFourMaxima(nn.Module):
    """2x2 max-pool (stride 2, an odd last row or column dropped) as the maximum of the four strided views."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        return torch.maximum(torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]),
                             torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


class MaxPoolAmax(nn.Module):
    """2x2 max-pool (stride 2, an odd last row or column dropped) as ``amax`` over each window of a reshape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        x = x[..., :2 * h, :2 * w]
        return x.unflatten(-1, (w, 2)).unflatten(-3, (h, 2)).amax((-3, -1))


def swap_pools(net: nn.Module, pool: type[nn.Module]) -> nn.Module:
    """``net`` with every ``MaxPool2d(2)`` replaced by ``pool()``."""
    for name, child in net.named_children():
        if isinstance(child, nn.MaxPool2d) and child.kernel_size in (2, (2, 2)):
            setattr(net, name, pool())
        else:
            swap_pools(child, pool)
    return net


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(||x - ref|| / ||ref||, max |x - ref| / max |ref|)``."""
    d = (x.double() - ref).abs()
    return (d.norm() / ref.norm()).item(), (d.max() / ref.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--no_compile", action="store_true", help="leave out torch.compile")
    opts = parser.parse_args()

    from cifarlab.precision import cpu_info, fastest_precision

    model, dm = fast_recipe(opts.root)
    dm.setup("test")
    x, _ = dm.train_set.batch(range(min(5000, len(dm.train_set))))
    model.net.init_whitening(model.normalize(x))  # as fit's on_fit_start
    model.net.whiten.bias.requires_grad_(False)  # as in all but the first 6 of the recipe's 243 steps
    precision = fastest_precision("cpu")
    autocast = autocast_for(precision)
    batch_size = min(dm.batch_size, len(dm.train_set))

    kinds = {"as shipped": model}
    for name, pool in (("max-pool without indices, 4 maxima", MaxPoolFourMaxima),
                       ("max-pool without indices, amax", MaxPoolAmax)):
        kinds[name] = copy.deepcopy(model)
        swap_pools(kinds[name].net, pool)
    if not opts.no_compile:
        kinds["torch.compile (inductor)"] = copy.deepcopy(model)
        kinds["torch.compile (inductor)"].net = torch.compile(kinds["torch.compile (inductor)"].net)
    optimizers = {name: m.make_optimizer() for name, m in kinds.items()}
    for m in kinds.values():
        m.train()

    def step(name: str, b) -> None:
        with autocast():
            loss = kinds[name].training_step(b, 0)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    # The same pooled output and input gradient as the shipped max-pool (on fp32, where there are no ties)?
    probe = torch.randn(4, 8, 31, 31, requires_grad=True)
    want = nn.MaxPool2d(2)(probe)
    (grad_want,) = torch.autograd.grad(want.square().sum(), probe)
    for pool in (MaxPoolFourMaxima, MaxPoolAmax):
        got = pool()(probe)
        (grad_got,) = torch.autograd.grad(got.square().sum(), probe)
        assert torch.equal(got, want) and torch.allclose(grad_got, grad_want), pool.__name__

    timed = {name: (lambda b, name=name: step(name, b)) for name in kinds}
    seconds, first = in_turns(timed, batches(dm, batch_size), opts.repeats)

    print(f"CPU: {cpu_info()[0]}; torch {torch.__version__}; {torch.get_num_threads()} threads; {precision}; "
          f"batch {batch_size}; median of {opts.repeats} rounds")
    base = statistics.median(seconds["as shipped"])
    print("| training step | seconds | / as shipped | first step (s) |\n|---|---:|---:|---:|")
    for name, times in seconds.items():
        print(f"| {name} | {statistics.median(times):.3f} | {statistics.median(times) / base:.3f} | "
              f"{first[name]:.1f} |")

    # The whitening conv: oneDNN's bf16 kernel against an exact one.
    conv = model.net.whiten
    images, _ = dm.test_set.batch(range(min(2000, len(dm.test_set))))
    x = model.normalize(images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double())
        fp32 = conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = conv(x)
        exact_bf16 = torch.nn.functional.conv2d(x.bfloat16().double(), conv.weight.bfloat16().double(),
                                                conv.bias.bfloat16().double()).bfloat16()
    print(f"whitening conv {tuple(conv.weight.shape)} on {len(x)} test images; error relative to fp64 "
          f"(norm, max):")
    for name, out in (("fp32", fp32), ("bf16 autocast (oneDNN)", bf16), ("exact bf16 (rounded inputs, fp64 sums)",
                                                                         exact_bf16)):
        norm, peak = relative_error(out, ref)
        print(f"  {name:40s} {norm:.2e}  {peak:.2e}")
    norm, peak = relative_error(bf16, exact_bf16.double())
    print(f"  {'bf16 autocast against exact bf16':40s} {norm:.2e}  {peak:.2e}")


if __name__ == "__main__":
    from cifarlab.errors import CifarlabError

    try:
        main()
    except CifarlabError as error:  # bad data or flags: one line, as the commands say it
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: error: {error}") from None
