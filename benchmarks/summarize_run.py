"""Print a run's per-epoch table (markdown) from its metrics.csv and test_metrics.json.

    python benchmarks/summarize_run.py runs/seed/version_0

Columns: epoch, cumulative training wall time, training images/s, train loss/acc, val loss/acc, and the test
accuracy after the epoch when the run used ``--trainer.callbacks+=cifarlab.callbacks.TestEveryEpoch``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifarlab.plots import read_metrics_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.csv")
    run = parser.parse_args().run_dir
    series = {k: dict(v) for k, v in read_metrics_csv(run / "metrics.csv").items()}
    cols = [("elapsed_s", "time (s)", "{:.0f}"), ("train_img_per_s", "img/s", "{:.0f}"),
            ("train_loss_epoch", "train loss", "{:.3f}"), ("train_acc", "train acc", "{:.2%}"),
            ("val_loss", "val loss", "{:.3f}"), ("val_acc", "val acc", "{:.2%}"),
            ("epoch_test_acc", "test acc", "{:.2%}")]
    cols = [c for c in cols if c[0] in series]
    print("| epoch | " + " | ".join(c[1] for c in cols) + " |")
    print("|---:" * (len(cols) + 1) + "|")
    for epoch in sorted(series.get("val_acc", series.get("train_acc", {}))):
        cells = [fmt.format(series[key][epoch]) if epoch in series[key] else "" for key, _, fmt in cols]
        print(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    test = run / "test_metrics.json"
    if test.exists():
        m = json.loads(test.read_text())
        print(f"\nFinal test (best checkpoint `{Path(m['ckpt_path']).name}`): accuracy {m['test_acc']:.2%}, "
              f"loss {m['test_loss']:.3f}, on {m['num_images']} images.")
        print("Per class: " + ", ".join(f"{c} {a:.1%}" for c, a in m["per_class_acc"].items()))


if __name__ == "__main__":
    main()
