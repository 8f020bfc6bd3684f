"""Time to accuracy of a recipe over several seeds: test accuracy and wall time per seed, mean and spread,
the accuracy after every epoch, and a time-to-accuracy curve PNG.

    python benchmarks/time_to_accuracy.py --data.root /tmp/cifar10-jpeg --seeds 0 1 2 [--config configs/fast.yaml]

Each seed is one `cifarlab fit` process, as a user runs it (data cache already built). Wall time = the whole
command (start-up, fit, final test with the recipe's TTA) minus the extra per-epoch test passes made only for
the curve (TestEveryEpoch logs their cost). The curve's x axis is training time at each epoch's end (those
passes excluded); its y axis is the test accuracy then, without TTA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cifarlab.plots import pyplot, read_metrics_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fast.yaml")
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run_dir", default="runs/time_to_accuracy")
    parser.add_argument("--target", type=float, default=0.907, help="accuracy whose crossing time is reported")
    parser.add_argument("--plot", default=None, help="PNG path (default <run_dir>/time_to_accuracy.png)")
    parser.add_argument("extra", nargs="*", help="more `cifarlab fit` flags, after --")
    opts = parser.parse_args()
    rows, curves = [], []
    for seed in opts.seeds:
        run_dir = Path(opts.run_dir) / f"seed{seed}"
        cmd = [sys.executable, "-m", "cifarlab.cli", "fit", "--config", opts.config, "--data.root", opts.root,
               "--run.dir", str(run_dir), "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks+=cifarlab.callbacks.TestEveryEpoch", *opts.extra]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        run = sorted(run_dir.glob("*/version_*"))[-1]
        series = {k: dict(v) for k, v in read_metrics_csv(run / "metrics.csv").items()}
        monitor = max(series.get("epoch_test_s", {0: 0.0}).values())
        acc = json.loads((run / "test_metrics.json").read_text())["test_acc"]
        epochs = sorted(series["epoch_test_acc"])
        times = [series["elapsed_s"][e] - series["epoch_test_s"][e] for e in epochs]
        accs = [series["epoch_test_acc"][e] for e in epochs]
        curves.append((times, accs))
        rows.append((seed, acc, wall - monitor))
        print(f"seed {seed}: test accuracy {acc:.2%} (with the recipe's TTA), wall time {wall - monitor:.0f} s "
              f"(command {wall:.0f} s, of which {monitor:.0f} s were the extra per-epoch test passes)", flush=True)
        print("  per epoch (training s, test acc without TTA): "
              + ", ".join(f"{e + 1}: {t:.0f} s {a:.2%}" for e, t, a in zip(epochs, times, accs)), flush=True)
    accs = np.array([r[1] for r in rows])
    walls = np.array([r[2] for r in rows])
    print(f"\nmean over {len(rows)} seeds: test accuracy {accs.mean():.2%} (min {accs.min():.2%}, "
          f"max {accs.max():.2%}, std {accs.std():.2%}); wall time {walls.mean():.0f} s "
          f"(min {walls.min():.0f}, max {walls.max():.0f})")
    print(f"runs reaching {opts.target:.1%}: {(accs >= opts.target).sum()} of {len(rows)}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (times, accs_), (seed, *_) in zip(curves, rows):
        ax.plot(times, np.array(accs_) * 100, marker="o", label=f"seed {seed}")
    ax.axhline(opts.target * 100, color="gray", linestyle="--", label=f"{opts.target:.1%}")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test accuracy after the epoch, no TTA (%)")
    ax.set_ylim(max(0, min(min(c[1]) for c in curves) * 100 - 5), 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{opts.config}: time to accuracy")
    fig.tight_layout()
    plot = Path(opts.plot or Path(opts.run_dir) / "time_to_accuracy.png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    print(f"curve: {plot}")


if __name__ == "__main__":
    main()
