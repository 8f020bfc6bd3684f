"""Training throughput of the custom ResNet: the seed's path against cifarlab's best, side by side.

    python benchmarks/throughput.py --data.root /tmp/cifar10-jpeg [--steps 20] [--warmup 5] [--batch_size 256]

(a) seed-style: fp32, NCHW, per-sample albumentations in a DataLoader with 2 workers, Adam, default malloc.
(b) cifarlab: the precision cifarlab picks for this CPU (bf16-mixed autocast where bf16 is native, else fp32),
    channels-last, the same augmentation batched on uint8 tensors, the same optimizer,
    glibc malloc tuned as `cifarlab` does.
Each runs in its own process (malloc settings are per process) through the Lightning Trainer; images/s are
measured over `--steps` optimizer steps after `--warmup` steps. Prints both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from cifarlab.precision import fastest_precision

PATHS = {
    "seed": {"precision": "32-true", "channels_last": False, "backend": "albumentations", "workers": 2,
             "malloc": False},
    "cifarlab": {"precision": fastest_precision("cpu"), "channels_last": True, "backend": "tensor", "workers": 0,
                 "malloc": True},
}


def measure(which: str, root: str, steps: int, warmup: int, batch_size: int, val_size: int) -> float:
    import lightning as L

    from cifarlab.cli import tune_malloc
    from cifarlab.data import CIFARDataModule
    from cifarlab.module import ImageClassifier
    from cifarlab.transforms import AugmentConfig

    path = PATHS[which]
    if path["malloc"]:
        tune_malloc()

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    L.seed_everything(0)
    dm = CIFARDataModule(root=root, batch_size=batch_size, num_workers=path["workers"], val_size=val_size,
                         augment=AugmentConfig(backend=path["backend"]))
    model = ImageClassifier(optimizer="adam", lr=1e-3, channels_last=path["channels_last"])
    timer = Timer()
    trainer = L.Trainer(max_steps=warmup + steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision=path["precision"],
                        callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    return steps * batch_size / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--val_size", type=int, default=5000, help="held out, as in training (not timed)")
    parser.add_argument("--which", choices=list(PATHS), help=argparse.SUPPRESS)  # child process
    opts = parser.parse_args()
    if opts.which:
        speed = measure(opts.which, opts.root, opts.steps, opts.warmup, opts.batch_size, opts.val_size)
        print(json.dumps({"img_per_s": speed}))
        return
    results = {}
    for which in PATHS:
        out = subprocess.run([sys.executable, __file__, "--data.root", opts.root, "--steps", str(opts.steps),
                              "--warmup", str(opts.warmup), "--batch_size", str(opts.batch_size),
                              "--val_size", str(opts.val_size), "--which", which],
                             check=True, capture_output=True, text=True).stdout
        results[which] = json.loads(out.strip().splitlines()[-1])["img_per_s"]
        print(f"{which:>9}: {results[which]:.0f} training images/s  ({PATHS[which]})", flush=True)
    print(f"ratio cifarlab / seed: {results['cifarlab'] / results['seed']:.2f}x")


if __name__ == "__main__":
    main()
