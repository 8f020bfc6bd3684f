"""Loss-based pruning (InfoBatch): which images an epoch leaves out, their weights, the data module's batches, a whole
pruned run through the CLI, its recorded scores and its resume, and bad settings."""

from pathlib import Path

import pytest
import torch
from conftest import NARROW
from test_small_data import make_small_folder

from cifarlab.cli import main
from cifarlab.data import CIFARDataModule
from cifarlab.errors import ConfigError
from cifarlab.pruning import LossPruning, LossPruningConfig, PrunedSampler


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_first_epoch_and_unscored_images_are_whole():
    pruning = LossPruning(100, LossPruningConfig(prune=0.5))
    index = pruning.draw(_gen())
    assert sorted(index.tolist()) == list(range(100)) and pruning.left_out == 0
    assert torch.equal(pruning.weights, torch.ones(100))


def test_below_mean_images_are_left_out_at_the_rate_and_the_kept_ones_weighted():
    n = 10_000
    pruning = LossPruning(n, LossPruningConfig(prune=0.5))
    low = torch.arange(n) % 4 != 0  # three quarters of the images fit well: loss 0.1, the rest 2.0
    pruning.record(torch.arange(n), torch.where(low, 0.1, 2.0))
    index = pruning.draw(_gen())
    drawn = torch.zeros(n, dtype=torch.bool)
    drawn[index] = True
    assert drawn[~low].all()  # above the mean: always in
    share_out = 1 - drawn[low].float().mean().item()
    assert 0.47 < share_out < 0.53  # prune 0.5 of the below-mean ones
    assert pruning.left_out == n - len(index) == int((~drawn).sum())
    assert torch.allclose(pruning.weights[low & drawn], torch.tensor(2.0))  # 1 / (1 - 0.5)
    assert torch.equal(pruning.weights[~low], torch.ones(int((~low).sum())))
    assert len(set(index.tolist())) == len(index)  # no image twice
    whole = pruning.draw(_gen(), prune=False)  # after `until`: every image, unweighted
    assert len(whole) == n and torch.equal(pruning.weights, torch.ones(n))


def test_sampler_length_follows_the_last_epoch_and_repeats_under_a_seed():
    pruning = LossPruning(1000, LossPruningConfig(prune=0.9))
    pruning.record(torch.arange(1000), torch.linspace(0, 1, 1000))
    sampler = PrunedSampler(pruning, lambda: True)
    assert len(sampler) == 1000
    torch.manual_seed(3)
    first = list(sampler)
    assert len(sampler) == len(first) < 1000
    torch.manual_seed(3)
    assert list(sampler) == first


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="prune"):
        CIFARDataModule(root="x", pruning={"prune": 1.0})
    with pytest.raises(ConfigError, match="until"):
        CIFARDataModule(root="x", pruning={"prune": 0.5, "until": 2})
    with pytest.raises(ConfigError, match="backend tensor"):
        CIFARDataModule(root="x", pruning={"prune": 0.5}, augment={"backend": "albumentations"})


def _fit(root: Path, runs: Path, *extra: str) -> None:
    main(["fit", "--config", "fast", "--data.root", str(root), "--run.dir", str(runs), *NARROW,
          "--data.eval_batch_size", "64", "--trainer.enable_progress_bar", "false", "--data.pruning.prune", "0.8",
          *extra])


def test_a_pruned_run_trains_its_steps_over_shorter_epochs_and_resumes_with_its_scores(tmp_path):
    root = make_small_folder(tmp_path / "data", {"ant": 300, "bee": 200, "cow": 100})
    _fit(root, tmp_path / "runs", "--trainer.max_steps", "30", "--data.batch_size", "64",
         "--data.pruning.until", "0.8")
    run = tmp_path / "runs" / "fast" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30  # the steps asked for: the schedule's length, not 8 epochs
    assert ckpt["epoch"] >= 4  # 9 batches of 64 per whole epoch: 30 steps take more than 3 when pruned
    scores = ckpt["CIFARDataModule"]["pruning"]["scores"]
    assert len(scores) == 600 and torch.isfinite(scores).float().mean() > 0.9  # drop_last leaves a few unscored
    assert ckpt["datamodule_hyper_parameters"]["pruning"] == {"prune": 0.8, "until": 0.8}
    # Resumed for 2 more steps (128 images): the other scores come back from the checkpoint, none reset to unscored.
    _fit(root, tmp_path / "runs", "--trainer.max_steps", "32", "--data.batch_size", "64",
         "--ckpt_path", "last")
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 32
    kept = resumed["CIFARDataModule"]["pruning"]["scores"] == scores
    assert kept.sum() >= int(torch.isfinite(scores).sum()) - 128


def test_a_pruned_run_on_a_budget_trains_to_its_plan(tmp_path, capsys):
    root = make_small_folder(tmp_path / "data")
    _fit(root, tmp_path / "runs", "--budget", "30s")
    run = tmp_path / "runs" / "fast" / "version_0"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    plan = next(v for k, v in state["callbacks"].items() if k.startswith("TimeBudget"))["plan"]
    assert state["global_step"] == plan["steps"] > 0 and (run / "test_metrics.json").exists()
    assert torch.isfinite(state["CIFARDataModule"]["pruning"]["scores"]).any()


def test_pruning_needs_a_step_count(tmp_path, capsys):
    root = make_small_folder(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        _fit(root, tmp_path / "runs", "--trainer.max_steps", "-1", "--trainer.max_epochs", "2",
             "--data.batch_size", "64")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--trainer.max_steps N" in err[0]
