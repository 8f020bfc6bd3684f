"""``cifarlab lr-find``: the LR range test on the recipe's model and data, written as a plot, the points and a
config fragment to train with."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from jsonargparse.typing import PositiveFloat, PositiveInt

from cifarlab.commands.recipe import RecipeCLI, without_options
from cifarlab.files import atomic_path
from cifarlab.lr_find import LRSweep, lr_range_test
from cifarlab.plots import pyplot
from cifarlab.runs import lr_find_dir


def lr_find(cli: RecipeCLI, min_lr: PositiveFloat = 1e-7, max_lr: PositiveFloat = 10.0, num_iter: PositiveInt = 200,
            out: str | None = None) -> dict:
    """LR range test: train the recipe's model for a few hundred batches with the LR growing exponentially, and
    suggest the LR of the steepest loss descent.

    Args:
        min_lr: First LR of the sweep.
        max_lr: Last LR of the sweep.
        num_iter: Batches in the sweep (the LR grows exponentially).
        out: Output folder (default <run.dir>/<run.name>/lr_find).

    Returns ``{"lr": suggestion, "plot": lr_find.png, "config": suggested_lr.yaml}``.
    """
    sweep = lr_range_test(cli.trainer, cli.model, cli.datamodule, min_lr, max_lr, num_iter)
    folder = Path(out or lr_find_dir(cli.config["run"]["dir"], cli.config["run"]["name"]))
    with atomic_path(folder / "lr_find.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "smoothed_loss"])
        writer.writerows(zip(sweep.lrs.tolist(), sweep.losses.tolist()))
    plot_sweep(sweep, folder / "lr_find.png")
    config = folder / "suggested_lr.yaml"
    with atomic_path(config) as tmp:
        tmp.write_text("# written by `cifarlab lr-find`: the steepest loss descent against log(lr) in lr_find.png\n"
                       f"model:\n  optimizer:\n    lr: {sweep.suggestion:.6g}\n")
    return {"lr": sweep.suggestion, "plot": folder / "lr_find.png", "config": config}


def plot_sweep(sweep: LRSweep, path: Path) -> None:
    """Loss against LR (log scale), the suggestion marked."""
    lrs, losses, best = sweep.lrs, sweep.losses, sweep.best
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses)
    ax.plot(lrs[best], losses[best], "o", color="red", markersize=9, label=f"suggested lr = {sweep.suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"LR range test: {len(lrs)} steps, exponential {sweep.min_lr:g} -> {sweep.max_lr:g}")
    finite = losses[np.isfinite(losses)]
    # Up to 3x the loss of the sweep's first half: the divergence at the end would squash the descent.
    ax.set_ylim(finite.min() * 0.95, min(finite.max(), 3 * finite[: max(1, len(finite) // 2)].max()) * 1.05)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str]) -> None:
    result = RecipeCLI(lr_find, argv).run_command()
    recipe = " ".join(without_options(argv, "--min_lr", "--max_lr", "--num_iter", "--out"))
    print(f"suggested max LR: {result['lr']:.4g}  (plot: {result['plot']})")
    print(f"train with it:    cifarlab fit {recipe} --model.optimizer.lr {result['lr']:.4g}")
    print(f"              or: cifarlab fit {recipe} --config {result['config']}")
