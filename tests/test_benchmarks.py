"""The benchmark scripts run (on a tiny setting: their numbers come from real runs, in docs/results.md).

Each script runs in a Python process of its own (5-100 s each on 2 cores), so those tests are marked slow: CI runs
them (`pytest -m slow`), the README's `pytest` does not. Every packaged recipe trains by default, on a few batches."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarlab.recipes import packaged_recipes

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd=REPO):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_time_to_accuracy_runs_seeds_and_plots(image_folder, tmp_path):
    out = _run("benchmarks/time_to_accuracy.py", "--data.root", image_folder, "--seeds", "0", "1",
               "--run_dir", tmp_path / "tta", "--", "--trainer.max_epochs", "2", "--data.batch_size", "16",
               "--data.val_size", "12")
    assert "seed 0: test accuracy" in out and "seed 1: test accuracy" in out and "mean over 2 seeds" in out
    assert (tmp_path / "tta" / "time_to_accuracy.png").exists()


@pytest.mark.slow
def test_throughput_compares_both_paths(image_folder):
    out = _run("benchmarks/throughput.py", "--data.root", image_folder, "--steps", "2", "--warmup", "1",
               "--batch_size", "8", "--val_size", "12")
    assert "seed:" in out and "cifarlab:" in out and "ratio cifarlab / seed" in out


@pytest.mark.slow
def test_latency_reports_both_networks():
    out = _run("benchmarks/latency.py", "--repeats", "1")
    assert out.count("| custom_resnet |") == 2 and out.count("| airbench |") == 2


@pytest.mark.slow
def test_precision_compares_fp32_and_bf16():
    out = _run("benchmarks/precision.py", "--batch_size", "4", "--steps", "1", "--archs", "airbench")
    assert "cifarlab picks: " in out and out.count("| airbench |") == 1


@pytest.mark.slow
def test_app_latency_and_faithfulness(smoke_run):
    root, run, ckpt = smoke_run
    out = _run("benchmarks/app_latency.py", "--ckpt", ckpt, "--repeats", "1")
    assert "32x32 upload" in out and "4032x3024 upload" in out
    out = _run("benchmarks/cam_faithfulness.py", "--ckpt", ckpt, "--data.root", root, "--n", "6", "--batch", "3",
               "--layers", "layer3 (4x4)", "--methods", "Grad-CAM")
    assert "| layer3 (4x4) | Grad-CAM |" in out
    out = _run("benchmarks/summarize_run.py", run)
    assert "| 2 |" in out and "Final test" in out


@pytest.mark.slow
def test_selective_tta_reports_each_threshold(smoke_run):
    root, _, ckpt = smoke_run
    out = _run("benchmarks/selective_tta.py", ckpt, "--data.root", root, "--thresholds", "0.4", "0.9")
    assert "| (no TTA) | 0% |" in out and "| 0.4 |" in out and "| 0.9 |" in out and "| 1 (all) | 100% |" in out


@pytest.mark.slow
def test_app_latency_over_http(smoke_run):
    _, _, ckpt = smoke_run
    out = _run("benchmarks/app_latency.py", "--ckpt", ckpt, "--repeats", "2", "--http")
    for row in ("in-process handler", "REST API, keep-alive", "gradio_client, panels downloaded",
                "gradio_client, download_files=False", "a function returning its input", "kept-alive connection"):
        assert row in out


@pytest.mark.slow
def test_audit_speed_reports_each_step_and_the_findings(smoke_run):
    root, _, ckpt = smoke_run
    out = _run("benchmarks/audit_speed.py", "--ckpt", ckpt, "--data.root", root)
    assert "2-D map, t-SNE" in out and "near-duplicate search" in out
    assert "cleanlab flags" in out and "de-duplicated test set" in out


@pytest.mark.parametrize("recipe", sorted(set(packaged_recipes()) - {"smoke"}))  # smoke: tested everywhere
def test_every_recipe_trains(recipe, image_folder, tmp_path):
    import yaml

    from cifarlab.cli import main

    # Two training steps, one validation and one test batch: the recipe's own network, optimizer and schedule.
    main(["fit", "--config", str(REPO / "configs" / f"{recipe}.yaml"), "--data.root", str(image_folder),
          "--run.dir", str(tmp_path), "--trainer.max_epochs", "1", "--data.batch_size", "16", "--data.val_size", "12",
          "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"])
    assert list(tmp_path.glob(f"{recipe}/version_0/test_metrics.json"))
    # The checkpoint alone rebuilds the recipe's network (loading is strict: every weight's shape must match, the
    # wide recipe's widths included).
    from cifarlab.module import ImageClassifier

    ckpt = tmp_path / recipe / "version_0" / "checkpoints" / "last.ckpt"
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    recipe_model = yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text())["model"]
    assert model.hparams.arch == recipe_model.get("arch", "custom_resnet")
    assert model.hparams.optimizer["name"] == recipe_model.get("optimizer", {}).get("name", "adam")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    if recipe == "wide":
        assert model.net.block3.conv2.out_channels == 384


@pytest.mark.slow
@pytest.mark.parametrize("same", [[], ["--same"]], ids=["different", "same"])
def test_app_load_answers_every_request(smoke_run, same):
    root, _, ckpt = smoke_run
    out = _run("benchmarks/app_load.py", "--ckpt", ckpt, "--data.root", root, "--requests", "4", "--waves", "1",
               *same)
    assert "wave 1: answered 4/4, errors 0, wrong 0" in out
    assert ("of the same image" in out) == bool(same)


@pytest.fixture(scope="module")
def folder_1k(tmp_path_factory):
    """A synthetic folder with more training images than airbench94's batch of 1,024 (its loader drops the rest)."""
    from conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("k") / "data", n_train=350, n_test=6)


@pytest.mark.slow
@pytest.mark.parametrize("fp32", [False, True])
def test_peer_runs_airbench_and_cifarlab_side_by_side(folder_1k, tmp_path, fp32):
    out = _run("benchmarks/peer.py", "--data.root", folder_1k, "--seeds", "0", "--peer_epochs", "1",
               "--run_dir", tmp_path, *(["--fp32"] if fp32 else []), "--", "--trainer.max_steps", "2",
               "--data.batch_size", "64", "--data.val_size", "0")
    assert out.startswith("CPU: ") and "seed 0: airbench94 " in out and "seed 0: cifarlab " in out
    assert "time ratio cifarlab / airbench94: " in out
    if fp32:
        assert "peer precision: fp32 (forced)" in out and "--trainer.precision 32-true" in out


@pytest.mark.slow
def test_budget_benchmark_runs_both_sides(folder_1k, tmp_path):
    out = _run("benchmarks/budget.py", "--data.root", folder_1k, "--budgets", "40s", "--run_dir", tmp_path,
               "--", "--data.batch_size", "64", "--data.val_size", "0")
    assert "airbench94 here" in out and "budget 40s, seed 0: cifarlab " in out and "| 40s | 0 |" in out
    assert "cifarlab: budget 40s" in out  # the plan line of the run


@pytest.mark.slow
def test_throughput_fast_reports_the_ceiling(folder_1k):
    out = _run("benchmarks/throughput.py", "--data.root", folder_1k, "--steps", "1", "--warmup", "1",
               "--val_size", "12", "--batch_size", "256", "--fast", "--profile", "1")  # 988 images: 3 steps
    assert "fast: " in out and "of this machine's ceiling" in out
    conv = re.search(r"convolutions (\d+)% of the CPU time", out)
    assert conv and 0 < int(conv.group(1)) <= 100, out
    assert re.search(r"^ +\d+\.\d%  aten::", out, re.M), out  # the op table


@pytest.mark.slow
def test_step_levers_times_each_kind_and_checks_the_whitening_conv(folder_1k):
    out = _run("benchmarks/step_levers.py", "--data.root", folder_1k, "--repeats", "1", "--no_compile")
    for row in ("as shipped", "max-pool without indices, 4 maxima", "max-pool without indices, amax"):
        assert re.search(rf"^\| {row} \| \d+\.\d+ \| \d+\.\d+ \|", out, re.M), out
    exact = re.search(r"bf16 autocast against exact bf16 +(\S+)", out)
    assert exact and float(exact.group(1)) < 1e-3, out  # oneDNN's 2x2 bf16 conv as exact as bf16 allows


@pytest.mark.slow
def test_flagged_grid_shows_cleanlabs_ranking(image_folder, tmp_path):
    import numpy as np

    from cifarlab.data import CIFARDataModule

    labels = CIFARDataModule(root=str(image_folder), val_size=0).load_splits()["train"].labels
    probs = np.full((len(labels), 3), 0.05, np.float32)
    probs[np.arange(len(labels)), labels] = 0.9
    probs[7] = [0.02, 0.02, 0.02]
    probs[7, (labels[7] + 1) % 3] = 0.96  # one confident disagreement: the first flagged
    np.savez(tmp_path / "oof.npz", probs=probs / probs.sum(1, keepdims=True), labels=labels)
    out = _run("benchmarks/flagged_grid.py", "--data.root", image_folder, "--oof", tmp_path / "oof.npz",
               "--count", "5", "--out", tmp_path / "grid")
    assert "   1  #7 " in out and (tmp_path / "grid" / "flagged_1-1.png").exists()


@pytest.mark.slow
def test_flagged_grid_ranks_the_test_set_from_an_ensemble_and_counts_verdicts(smoke_run, tmp_path):
    root, run, ckpt = smoke_run
    (tmp_path / "verdicts.txt").write_text("# index verdict\n" + "".join(f"{i} E\n" for i in range(0, 18, 2)))
    (tmp_path / "second.txt").write_text("".join(f"{i} C\n" for i in range(0, 18, 2)))  # a reviewer who disagrees
    out = _run("benchmarks/flagged_grid.py", "--data.root", root, "--ckpt", ckpt, run / "checkpoints" / "last.ckpt",
               "--count", "5", "--out", tmp_path / "grid", "--verdicts", tmp_path / "verdicts.txt",
               tmp_path / "second.txt")
    assert "the mean of 2 checkpoint(s)" in out and "test images" in out
    shown = [int(line.split("#")[1].split()[0]) for line in out.splitlines() if line.startswith("   ")]
    if shown:
        errors = sum(i % 2 == 0 for i in shown)
        assert f"ranks 1-{len(shown)}: " in out and (f"{errors} clear label errors" in out or errors == 0)
        assert f"the two reviewers agree on 0 of {errors} images" in out
    out = _run("benchmarks/flagged_grid.py", "--data.root", root, "--ckpt", ckpt, "--out", tmp_path / "blind",
               "--blind", tmp_path / "verdicts.txt")
    assert "9 images judged" in out and (tmp_path / "blind" / "blind_1-9.png").exists()
    (tmp_path / "bad.txt").write_text("12 E\n13 maybe\n")
    proc = subprocess.run([sys.executable, "benchmarks/flagged_grid.py", "--data.root", str(root), "--ckpt", str(ckpt),
                           "--blind", str(tmp_path / "bad.txt")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'bad.txt'}, line 2: '13 maybe' is not `<index> <E|A|C>`: correct or remove it")


@pytest.mark.slow
def test_duplicates_benchmark_plants_edited_copies_and_scores_both_searches(smoke_run):
    root, _, ckpt = smoke_run
    out = _run("benchmarks/duplicates.py", "--data.root", root, "--ckpt", ckpt, "--n", "5")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"shift", "crop", "flip", "colour", "jpeg", "combined", "all"} <= set(rows)
    assert "threshold: cifarlab 0.92, baseline 0.90" in out and "CPU:" in out
    assert re.search(r"^\| all( \| \d+\.\d%){7} \|$", rows["all"], re.M), rows["all"]  # Datalab's columns too


@pytest.mark.slow
@pytest.mark.parametrize("script", ["duplicates.py", "step_levers.py", "selective.py"])
def test_benchmarks_say_what_is_wrong_with_the_data_in_one_line(script, tmp_path):
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--data.root", str(tmp_path / "missing"),
                           *(["--ckpt", "unused.ckpt"] if script == "duplicates.py" else [])],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{script}: error: data root "), proc.stderr[-500:]
