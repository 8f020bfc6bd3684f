"""Training throughput of the custom ResNet: the seed's path against cifarlab's best, side by side.

    python benchmarks/throughput.py --data.root /tmp/cifar10-jpeg [--steps 20] [--warmup 5] [--batch_size 256]

(a) seed-style: fp32, NCHW, per-sample albumentations in a DataLoader with 2 workers, Adam, default malloc.
(b) cifarlab: the precision cifarlab picks for this CPU (bf16-mixed autocast where bf16 is native, else fp32),
    channels-last, the same augmentation batched on uint8 tensors, the same optimizer,
    glibc malloc tuned as `cifarlab` does.
Each runs in its own process (malloc settings are per process) through the Lightning Trainer; images/s are
measured over `--steps` optimizer steps after `--warmup` steps. Prints both and the ratio.

For every measured path it also prints training GFLOP/s: images/s x 3 x the forward FLOPs per image of the
model summary (Lightning's ``ModelSummary``, which counts a multiply-add as 2 FLOPs; backward ~2x forward),
against a ceiling measured on this machine in the same process: a large 3x3 conv (256 -> 256 channels, 16x16,
batch 256, channels-last) forward + backward in the same precision, the best of a few calls.
``--fast`` measures the fast recipe's training steps instead (fast.yaml as it ships: airbench network, Muon, its
batch, the precision cifarlab picks, batched augmentation) against that ceiling. ``--profile N`` then profiles N
more steps (untimed) and prints the convolutions' share of their CPU time and the top ops by their own time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cifarlab.precision import fastest_precision

FAST = Path(__file__).resolve().parents[1] / "configs" / "fast.yaml"

PATHS = {
    "fast": {"precision": fastest_precision("cpu"), "channels_last": True, "backend": "tensor", "workers": 0,
             "malloc": True},
    "seed": {"precision": "32-true", "channels_last": False, "backend": "albumentations", "workers": 2,
             "malloc": False},
    "cifarlab": {"precision": fastest_precision("cpu"), "channels_last": True, "backend": "tensor", "workers": 0,
                 "malloc": True},
}


def ceiling_gflops(precision: str, repeats: int = 4) -> float:
    """Best GFLOP/s of a 256 -> 256, 3x3 conv forward + backward at 16x16, batch 256, in ``precision``."""
    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(256, 256, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    flops = 3 * 2 * 256 * 256 * 9 * 16 * 16 * 256  # forward, input gradient, weight gradient
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
            out = conv(x)
        out.float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def forward_flops_per_image(model) -> float:
    """FLOPs of one image's forward pass, from Lightning's model summary (on the model's example input)."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    return ModelSummary(model, max_depth=1).total_flops / len(model.example_input_array)


def measure(which: str, root: str, steps: int, warmup: int, batch_size: int, val_size: int,
            profile: int = 0) -> dict:
    import lightning as L

    from cifarlab.data import CIFARDataModule
    from cifarlab.memory import tune_malloc
    from cifarlab.module import ImageClassifier
    from cifarlab.transforms import AugmentConfig

    path = PATHS[which]
    if path["malloc"]:
        tune_malloc()

    class Timer(L.Callback):
        profiler = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                self.start = time.perf_counter()
            if trainer.global_step == warmup + steps:  # the timed steps are over: profile the next ones
                self.seconds = time.perf_counter() - self.start
                import torch

                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.start()

        def on_train_end(self, trainer, pl_module):
            if self.profiler is None:
                self.seconds = time.perf_counter() - self.start
            else:
                self.profiler.stop()

    L.seed_everything(0)
    if which == "fast":  # the recipe itself, as `cifarlab fit --config configs/fast.yaml` builds it
        from cifarlab.commands.fit import CifarLabCLI

        cli = CifarLabCLI(args=["--config", str(FAST), "--data.root", root, "--data.val_size", str(val_size),
                                "--trainer.logger", "false",
                                *(["--data.batch_size", str(batch_size)] if batch_size else [])],
                          run=False, save_config_callback=None)
        model, dm = cli.model, cli.datamodule
        batch_size = dm.batch_size
    else:
        batch_size = batch_size or 256
        dm = CIFARDataModule(root=root, batch_size=batch_size, num_workers=path["workers"], val_size=val_size,
                             augment=AugmentConfig(backend=path["backend"]))
        model = ImageClassifier(optimizer={"name": "adam", "lr": 1e-3}, channels_last=path["channels_last"])
    flops = forward_flops_per_image(model)
    timer = Timer()
    trainer = L.Trainer(max_steps=warmup + steps + profile, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision=path["precision"], callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    img_per_s = steps * batch_size / timer.seconds
    ops = []
    if timer.profiler is not None:  # share of the profiled steps' CPU time per op, by its own (self) time
        events = timer.profiler.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        ops = [(e.key, e.self_cpu_time_total / total) for e in sorted(events, key=lambda e: -e.self_cpu_time_total)]
    return {"img_per_s": img_per_s, "gflops": img_per_s * 3 * flops / 1e9, "ops": ops[:10],
            "conv_share": sum(share for key, share in ops if "convolution" in key),
            "ceiling": ceiling_gflops(path["precision"]), "precision": path["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="seed/cifarlab paths: default 256; --fast: the recipe's unless given")
    parser.add_argument("--val_size", type=int, default=5000, help="held out, as in training (not timed)")
    parser.add_argument("--fast", action="store_true", help="the fast recipe's training steps against the ceiling")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed steps, profile N more and print where their CPU time went (by op)")
    parser.add_argument("--which", choices=list(PATHS), help=argparse.SUPPRESS)  # child process
    opts = parser.parse_args()
    if opts.profile < 0:
        parser.error(f"--profile takes a number of steps >= 0, got {opts.profile}")
    if opts.which:
        print(json.dumps(measure(opts.which, opts.root, opts.steps, opts.warmup, opts.batch_size, opts.val_size,
                                 opts.profile)))
        return
    from cifarlab.precision import cpu_info

    print(f"CPU: {cpu_info()[0]}")
    results = {}
    for which in ["fast"] if opts.fast else ["seed", "cifarlab"]:
        out = subprocess.run([sys.executable, __file__, "--data.root", opts.root, "--steps", str(opts.steps),
                              "--warmup", str(opts.warmup), "--val_size", str(opts.val_size), "--which", which,
                              "--profile", str(opts.profile),
                              *(["--batch_size", str(opts.batch_size)] if opts.batch_size else [])],
                             check=True, capture_output=True, text=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        results[which] = got["img_per_s"]
        print(f"{which:>9}: {got['img_per_s']:.0f} training images/s  ({PATHS[which]})", flush=True)
        print(f"{'':>9}  {got['gflops']:.0f} training GFLOP/s = {got['gflops'] / got['ceiling']:.0%} of this machine's "
              f"ceiling ({got['ceiling']:.0f} GFLOP/s: large conv fwd + bwd, {got['precision']})", flush=True)
        if got["ops"]:
            print(f"{'':>9}  {opts.profile} more steps profiled (not timed): convolutions {got['conv_share']:.0%} of "
                  f"the CPU time; the top ops by their own time:")
            for key, share in got["ops"]:
                print(f"{'':>11}{share:6.1%}  {key}")
    if not opts.fast:
        print(f"ratio cifarlab / seed: {results['cifarlab'] / results['seed']:.2f}x")


if __name__ == "__main__":
    main()
