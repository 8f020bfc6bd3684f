"""The fast recipe on a data set far smaller than CIFAR-10: the batch is sized to the data, the learning rates scaled
with it, and the run's config and checkpoints record what ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import NARROW
from PIL import Image

from cifarlab.cli import main
from cifarlab.data import MIN_BATCHES, CIFARDataModule, batch_for
from cifarlab.errors import ConfigError
from cifarlab.settings import OptimizerConfig

FAST = "fast"
FAST_LR, FAST_MUON_LR, FAST_DECAY, FAST_BATCH = 1.028004, 0.205, 1.556614e-3, 1536  # fast.yaml's values
# Unbalanced classes (150/100/50 training images: 300) with some grey (L-mode) files among them.
TRAIN_COUNTS = {"ant": 150, "bee": 100, "cow": 50}
SMALL_BATCH = 64  # the largest power of two that 300 images hold MIN_BATCHES (3) times


def make_small_folder(root: Path, counts: dict[str, int] = TRAIN_COUNTS, n_test: int = 10, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/<i>.png`` with ``counts`` training images per class; every third file grey."""
    rng = np.random.default_rng(seed)
    for c, (name, n_train) in enumerate(counts.items()):
        for split, n in (("train", n_train), ("test", n_test)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                level = 40 + 80 * c  # the class is the brightness: learnable in colour and in grey
                img = np.clip(level + rng.integers(-25, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                pil = Image.fromarray(img)
                (pil.convert("L") if i % 3 == 0 else pil).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    return make_small_folder(tmp_path / "data")


def _fit(root: Path, runs: Path, *extra: str) -> None:
    main(["fit", "--config", FAST, "--data.root", str(root), "--run.dir", str(runs), *NARROW,
          "--data.eval_batch_size", "64", "--trainer.enable_progress_bar", "false", *extra])


def _recorded(run: Path) -> tuple[dict, dict]:
    """The run's config.yaml and its last checkpoint's contents."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    return config, torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_batch_for_keeps_a_batch_the_data_holds_and_else_takes_a_power_of_two():
    assert batch_for(50_000, FAST_BATCH) == FAST_BATCH  # CIFAR-10: the recipe unchanged
    assert batch_for(MIN_BATCHES * FAST_BATCH, FAST_BATCH) == FAST_BATCH
    assert batch_for(1437, FAST_BATCH) == 256  # a folder of 1,437 images: 5 batches an epoch
    assert batch_for(300, FAST_BATCH) == SMALL_BATCH and 300 // SMALL_BATCH >= MIN_BATCHES
    assert batch_for(MIN_BATCHES - 1, FAST_BATCH) == 0  # too few for even one image a batch


def test_learning_rates_follow_the_batch_as_the_recipes_derive_them():
    muon = OptimizerConfig(name="muon", lr=FAST_LR, weight_decay=FAST_DECAY, bn_lr_scale=85.6, muon_lr=FAST_MUON_LR)
    small, words = muon.for_batch(256, FAST_BATCH)
    assert small.lr == pytest.approx(FAST_LR / 6)  # SGD's per-example step kept
    assert (small.muon_lr, small.weight_decay, small.bn_lr_scale) == (FAST_MUON_LR, FAST_DECAY, 85.6)
    assert words == "learning rates scaled by 256/1536; Muon's kept"
    adam, words = OptimizerConfig(name="adam", lr=1e-3).for_batch(64, 256)
    assert adam.lr == pytest.approx(5e-4) and "sqrt(64/256)" in words


def test_a_batch_larger_than_the_data_is_one_line_outside_fit(small_folder):
    """Outside `cifarlab fit` (the library, lr-find), no batch is chosen for the user: a data set without one batch
    is an error that names the batch to pass."""
    dm = CIFARDataModule(root=str(small_folder), batch_size=FAST_BATCH, val_size=0)
    dm.setup("fit")
    with pytest.raises(ConfigError, match=r"--data.batch_size 1536 is larger than the 300 training images.*"
                                          r"--data.batch_size 64 or less"):
        dm.train_dataloader()


def test_fast_recipe_on_300_images_without_a_budget_adapts_and_resumes_as_it_ran(small_folder, tmp_path, capsys):
    _fit(small_folder, tmp_path, "--trainer.max_steps", "4")
    out = capsys.readouterr().out
    assert (f"cifarlab: batch {SMALL_BATCH} (the 300 training images hold fewer than {MIN_BATCHES} batches of 1536; "
            f"learning rates scaled by {SMALL_BATCH}/1536; Muon's kept)") in out
    run = tmp_path / "fast" / "version_0"
    config, state = _recorded(run)
    lr = FAST_LR * SMALL_BATCH / FAST_BATCH
    assert config["data"]["batch_size"] == SMALL_BATCH and config["model"]["optimizer"]["lr"] == pytest.approx(lr)
    assert config["model"]["optimizer"]["muon_lr"] == FAST_MUON_LR
    assert state["datamodule_hyper_parameters"]["batch_size"] == SMALL_BATCH
    assert state["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(lr)
    assert state["global_step"] == 4 and (run / "test_metrics.json").exists()

    # Resumed, it keeps the checkpoint's batch and learning rates: nothing is scaled a second time.
    _fit(small_folder, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "6")
    assert "the checkpoint's batch and learning rates" in capsys.readouterr().out
    config, state = _recorded(run)
    assert state["global_step"] == 6 and state["datamodule_hyper_parameters"]["batch_size"] == SMALL_BATCH
    assert state["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(lr)
    assert config["model"]["optimizer"]["lr"] == pytest.approx(lr)


def test_fast_recipe_on_300_images_with_a_budget_plans_the_chosen_batch(small_folder, tmp_path, capsys):
    """The budget path end to end (the real probe, at the chosen batch): the plan line says which batch and why,
    and config.yaml and the checkpoint record the batch, the learning rates and the plan that ran."""
    _fit(small_folder, tmp_path, "--budget", "30s")  # room for a loaded machine's probe
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("cifarlab: budget 30s: this machine trains"))
    assert (f" steps of {SMALL_BATCH} (the 300 training images hold fewer than {MIN_BATCHES} batches of 1536; "
            f"learning rates scaled by {SMALL_BATCH}/1536; Muon's kept) = ") in line
    run = tmp_path / "fast" / "version_0"
    config, state = _recorded(run)
    lr = FAST_LR * SMALL_BATCH / FAST_BATCH
    assert config["data"]["batch_size"] == SMALL_BATCH and config["model"]["optimizer"]["lr"] == pytest.approx(lr)
    assert state["hyper_parameters"]["optimizer"]["lr"] == pytest.approx(lr)
    plan = next(v for k, v in state["callbacks"].items() if k.startswith("TimeBudget"))["plan"]
    assert plan["steps_per_epoch"] == 300 // SMALL_BATCH and "64/1536" in plan["batch_note"]
    assert state["global_step"] == plan["steps"] > 0  # trained to the plan ...
    assert (run / "test_metrics.json").exists()  # ... and tested


def test_too_few_images_for_a_batch_of_two_is_one_line(tmp_path, capsys):
    root = make_small_folder(tmp_path / "data", counts={"ant": 3, "bee": 2}, n_test=2)
    with pytest.raises(SystemExit) as exit_info:
        _fit(root, tmp_path / "runs", "--trainer.max_steps", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "the 5 training images are too few to train on" in err[0]
