"""Slow end-to-end test on the real shared CIFAR-10 copy (runs in CI; `pytest -m "not slow"` skips it)."""

import json
import tarfile

import pytest
from conftest import SHARED_TARBALL

from cifarlab.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar10_jpeg(tmp_path_factory):
    if not SHARED_TARBALL.exists():
        pytest.skip(f"shared data copy not found at {SHARED_TARBALL}")
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(SHARED_TARBALL) as tar:
        tar.extractall(root, filter="data")
    return root / "cifar10-jpeg"


def test_one_short_epoch_on_real_cifar10_beats_chance_clearly(cifar10_jpeg, tmp_path, capsys):
    main(["stats", "--data.root", str(cifar10_jpeg), "--out", str(tmp_path / "stats")])
    out = capsys.readouterr().out
    assert "mean: [0.4913 0.4821 0.4465]" in out and "std:  [0.2452 0.2428 0.2606]" in out

    # 60 steps of 256 images with the seed recipe's model and schedule (~15k images, about a minute).
    main(["fit", "--config", "configs/seed.yaml", "--data.root", str(cifar10_jpeg), "--run.dir", str(tmp_path),
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "60", "--trainer.enable_progress_bar",
          "false", "--data.augment.backend", "tensor"])
    (run,) = (tmp_path / "seed").glob("version_*")
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["num_images"] == 10_000
    assert metrics["test_acc"] > 0.35, metrics["test_acc"]  # chance is 0.10


def test_the_main_job_in_small_a_budget_on_real_cifar10(cifar10_jpeg, tmp_path, capsys):
    """The README's main job with a 2-minute budget: it plans, trains, tests, and ends near the budget."""
    import time

    start = time.time()
    main(["fit", "--config", "configs/fast.yaml", "--data.root", str(cifar10_jpeg), "--run.dir", str(tmp_path),
          "--budget", "2m", "--trainer.enable_progress_bar", "false"])
    seconds = time.time() - start
    captured = capsys.readouterr()
    assert "cifarlab: budget 2m 00s: this machine trains" in captured.out + captured.err
    (run,) = (tmp_path / "fast").glob("version_*")
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["num_images"] == 10_000
    assert metrics["test_acc"] > 0.35, metrics["test_acc"]  # chance is 0.10; ~75% where bf16 is native
    assert seconds < 1.25 * 120, seconds  # a gross overrun fails; benchmarks/budget.py measures the fit


def test_ddp_run_on_real_cifar10_stopped_by_sigterm_resumes_and_finishes(cifar10_jpeg, tmp_path):
    """Two gloo processes on the real data (the smoke recipe, 20 batches an epoch), SIGTERM to the launching process
    mid-epoch, then the same command with --ckpt_path last: it continues from the saved step and finishes."""
    import signal
    import sys

    import torch
    from test_ddp import LIMIT_S, _Run, _slow

    runs, marker = tmp_path / "runs", tmp_path / "marker"
    args = [sys.executable, "-m", "cifarlab.cli", "fit", "--config", "configs/smoke.yaml", "--data.root",
            str(cifar10_jpeg), "--run.dir", str(runs), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
            "--trainer.devices", "2", "--trainer.max_epochs", "2"]
    run = _Run([*args, _slow("train", marker, step=25)], tmp_path / "stderr.txt")
    run.wait_for(marker)
    run.proc.send_signal(signal.SIGTERM)
    code, seconds = run.finish()
    assert code == 143 and seconds < 60, run.stderr()[-3000:]
    ckpt = runs / "smoke" / "version_0" / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 25 <= stopped_at < 40, stopped_at

    resumed = _Run([*args, "--ckpt_path", "last"], tmp_path / "resume.txt")
    code, _ = resumed.finish(limit=LIMIT_S * 2)
    assert code == 0, resumed.stderr()[-3000:]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 40  # 2 epochs x 20 batches
    metrics = json.loads((runs / "smoke" / "version_0" / "test_metrics.json").read_text())
    assert metrics["num_images"] == 1280  # smoke.yaml: 10 test batches of 64 on each of the two ranks
