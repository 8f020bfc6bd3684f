"""Shared by the training-step benchmarks (selective.py, step_levers.py): the fast recipe built as ``cifarlab fit``
builds it, augmented batches of the real data, and steps timed in turns."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import torch

FAST = Path(__file__).resolve().parents[1] / "configs" / "fast.yaml"


def fast_recipe(root: str, *flags: str):
    """``(model, datamodule)`` of ``configs/fast.yaml`` (plus ``flags``), set up for fit, with no Trainer: the
    schedule's length is set to 1,000 steps so that every step of a timing has a learning rate."""
    from cifarlab.commands.fit import CifarLabCLI
    from cifarlab.memory import tune_malloc

    tune_malloc()
    warnings.filterwarnings("ignore", message=".*self.trainer. reference is not registered.*")  # no Trainer here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # the script's own flags, not its
    torch.manual_seed(0)
    cli = CifarLabCLI(args=["--config", str(FAST), "--data.root", root, "--trainer.logger", "false", *flags],
                      run=False, save_config_callback=None)
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    model.hparams.schedule = {**model.hparams.schedule, "total_steps": 1000}
    return model, dm


def autocast_for(precision: str):
    """A context-manager factory: bf16 autocast where ``precision`` is bf16, else nothing."""
    if precision.startswith("bf16"):
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def batches(dm, batch_size: int, seed: int = 0):
    """A function returning a new augmented training batch ``(x, y)`` of ``batch_size`` random images per call."""
    gen = torch.Generator().manual_seed(seed)

    def batch():
        x, y = dm.train_set.batch(torch.randperm(len(dm.train_set), generator=gen)[:batch_size].tolist())
        return (dm.batch_augment(x, None) if dm.batch_augment is not None else x), y

    return batch


def in_turns(timed: dict, batch, repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each ``timed[name](b)`` once per round on a fresh batch, in turns, so that a shared machine's slow spells fall
    on all alike: ``(seconds of the repeats timed rounds, seconds of the warm-up round)`` per name. The warm-up round
    builds the kernels for each shape (and compiles, where something is compiled)."""
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    first: dict[str, float] = {}
    for round_ in range(repeats + 1):
        for name, fn in timed.items():
            b = batch()
            t0 = time.perf_counter()
            fn(b)
            if round_:
                seconds[name].append(time.perf_counter() - t0)
            else:
                first[name] = time.perf_counter() - t0
    return seconds, first
