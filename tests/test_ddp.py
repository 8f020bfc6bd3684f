"""Lightning DDP on CPU (gloo): two processes, metrics synchronised, evaluation sets counted exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from cifarlab.data import CIFARDataModule
from cifarlab.inference import load_classifier

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_logs_the_validation_accuracy_of_the_whole_split(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=32)
    runs, ranks = tmp_path / "runs", tmp_path / "ranks"
    spy = json.dumps({"class_path": "fault_helpers.RankMetrics", "init_args": {"folder": str(ranks)}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cifarlab.cli", "fit", "--config", str(REPO / "configs" / "smoke.yaml"),
         "--data.root", str(root), "--run.dir", str(runs), "--trainer.accelerator", "cpu",
         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.precision", "32-true",
         "--trainer.max_epochs", "2", "--data.batch_size", "8", "--data.val_size", "13",  # odd: 7 + 6 per rank
         "--checkpoint.monitor", "null", f"--trainer.callbacks+={spy}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world_size"] for m in per_rank] == [2, 2]

    # The final weights, evaluated in one process on the whole 13-image validation split.
    run = runs / "smoke" / "version_0"
    assert not (runs / "smoke" / "version_1").exists(), "both ranks log into one run folder"
    model = load_classifier(run / "checkpoints" / "last.ckpt")
    dm = CIFARDataModule(root=str(root), val_size=13, batch_size=8)
    dm.setup("fit")
    x, y = dm.val_set.batch(range(len(dm.val_set)))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    for metrics in per_rank:
        assert metrics["val_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert per_rank[0]["val_loss"] == pytest.approx(per_rank[1]["val_loss"], abs=1e-6)  # synchronised

    # The test after fit counts each of the 18 test images once (no DistributedSampler padding).
    assert json.loads((run / "test_metrics.json").read_text())["num_images"] == 18
    # Data cache and statistics were built once (rank 0's prepare_data), not raced by the two processes.
    cache = sorted(p.name.split("-")[0] for p in (root / ".cifarlab-cache").iterdir())
    assert cache == ["stats", "test", "train"], cache
