"""Lightning DDP on CPU (gloo): two processes, metrics synchronised, evaluation sets counted exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NARROW, make_image_folder
from run_helpers import lr_by_step

from cifarlab.checkpoint import load_classifier
from cifarlab.data import CIFARDataModule

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


def test_sigterm_in_one_process_stops_at_the_batch_saves_last_ckpt_and_resumes(tmp_path, capfd, monkeypatch):
    """The signal path without a second process (fast; the 2-process cases below are slow): SIGTERM at the start of
    step 3 sets the flag, the run stops at the end of that step, saves last.ckpt there and exits 143;
    ``--ckpt_path last`` then finishes the run from step 4."""
    from cifarlab import signals
    from cifarlab.cli import main

    monkeypatch.setattr(signals, "_received", [])  # the signals this process received: this test's only
    handler = signal.getsignal(signal.SIGTERM)
    root = make_image_folder(tmp_path / "data", n_train=12, n_test=2)  # 36 - 8 held out: 7 batches of 4 an epoch
    runs = tmp_path / "runs"
    args = ["fit", "--config", str(REPO / "configs" / "smoke.yaml"), "--data.root", str(root), "--run.dir", str(runs),
            *NARROW, "--trainer.precision", "32-true", "--trainer.max_epochs", "2", "--data.batch_size", "4",
            "--data.val_size", "8"]
    spy = json.dumps({"class_path": "fault_helpers.SignalAt", "init_args": {"step": 3, "signum": int(signal.SIGTERM)}})
    with pytest.raises(SystemExit) as exit_:
        main([*args, f"--trainer.callbacks+={spy}"])
    err = capfd.readouterr().err  # (the handler writes to file descriptor 2 itself)
    assert exit_.value.code == 143, err[-3000:]
    assert "SIGTERM received (rank 0): stopping at the end of this batch" in err
    assert err.strip().splitlines()[-1] == "cifarlab: stopped by SIGTERM"
    run = runs / "smoke" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 4)  # the signalled step finished, mid-epoch 0
    assert not (run / "test_metrics.json").exists() and not list(ckpt.parent.glob("*.tmp"))
    assert signal.getsignal(signal.SIGTERM) == handler  # the run put back the handler it found

    main([*args, "--ckpt_path", "last"])
    assert _progress(ckpt) == 14 and (run / "test_metrics.json").exists()
    assert sorted(lr_by_step(run)) == list(range(14))  # every step's LR logged once, before and after the stop


# --- stopping a 2-process run: SIGTERM / Ctrl-C save last.ckpt and stop every rank; a dead rank stops the others
SMOKE = str(REPO / "configs" / "smoke.yaml")
STEPS_PER_EPOCH = 5  # 3 classes x 32 images - 12 held out = 84, 42 per rank -> 5 batches of 8 (last one dropped)
EPOCHS = 4
TOTAL = EPOCHS * STEPS_PER_EPOCH
LIMIT_S = 120  # a hang fails the test instead of stalling CI


def _ddp_args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cifarlab.cli", "fit", "--config", SMOKE, "--data.root", str(root),
            "--run.dir", str(runs), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
            "--trainer.devices", "2", "--trainer.precision", "32-true", "--trainer.max_epochs", str(EPOCHS),
            "--trainer.log_every_n_steps", "1", "--data.batch_size", "8", "--data.val_size", "12", *extra]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    return env


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


class _Run:
    """``cifarlab fit`` under DDP in a process group of its own (so every rank can be signalled, as SLURM does),
    killed outright if it outlives ``LIMIT_S``."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        self.start = time.monotonic()

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_for(self, marker: Path) -> None:
        while not marker.exists() and self.proc.poll() is None and time.monotonic() - self.start < LIMIT_S:
            time.sleep(0.05)
        if not marker.exists():
            self.kill()
            pytest.fail(f"the run never reached the point to signal: {self.stderr()[-3000:]}")

    def ranks(self) -> list[int]:
        return _group(self.proc.pid)

    def finish(self, limit: float = LIMIT_S) -> tuple[int, float]:
        """Exit code and seconds taken; fails (after killing every rank) if any rank is still alive after ``limit``."""
        start = time.monotonic()
        try:
            code = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the launching process hung for {limit} s: {self.stderr()[-3000:]}")
        while self.ranks() and time.monotonic() - start < limit:
            time.sleep(0.1)
        if self.ranks():
            self.kill()
            pytest.fail(f"a rank outlived the launching process by {limit} s: {self.stderr()[-3000:]}")
        return code, time.monotonic() - start

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _progress(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data", n_train=32)


@pytest.fixture(scope="module")
def ddp_uninterrupted(ddp_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ddp_uninterrupted")
    run = _Run(_ddp_args(ddp_data, runs), runs / "stderr.txt")
    code, _ = run.finish()
    assert code == 0, run.stderr()[-3000:]
    return runs / "smoke" / "version_0"


def _slow(where: str, marker: Path, step: int) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "fault_helpers.SlowAt", "init_args": {
        "where": where, "marker": str(marker), "step": step, "pause": 0.4}})


@pytest.mark.slow
@pytest.mark.parametrize("where, target, signum", [
    ("train", "launcher", signal.SIGTERM),  # kill, timeout
    ("train", "every rank", signal.SIGTERM),  # SLURM's scancel and time limit
    ("train", "every rank", signal.SIGINT),  # Ctrl-C in a terminal
    ("val", "launcher", signal.SIGTERM),
    ("save", "every rank", signal.SIGTERM),
], ids=["SIGTERM-launcher-train", "SIGTERM-all-train", "Ctrl-C-all-train", "SIGTERM-launcher-val",
        "SIGTERM-all-save"])
def test_ddp_stop_saves_last_ckpt_and_stops_every_rank(ddp_data, ddp_uninterrupted, tmp_path, where, target,
                                                        signum):
    runs, marker = tmp_path / "runs", tmp_path / "marker"
    extra = [_slow(where, marker, step=7)] + (["--data.eval_batch_size", "2"] if where == "val" else [])
    run = _Run(_ddp_args(ddp_data, runs, *extra), tmp_path / "stderr.txt")
    run.wait_for(marker)
    assert len(run.ranks()) >= 2, "both ranks run"
    if target == "launcher":
        os.kill(run.proc.pid, signum)
    else:
        os.killpg(run.proc.pid, signum)
    code, seconds = run.finish()
    err = run.stderr()
    assert code == 128 + signum, err[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s to stop"
    assert "Traceback" not in err, err[-3000:]
    assert f"cifarlab: stopped by {signal.Signals(signum).name}" in err

    ckpt = runs / "smoke" / "version_0" / "checkpoints" / "last.ckpt"
    step = _progress(ckpt)
    assert 7 <= step < TOTAL, step
    assert not list(ckpt.parent.glob("*.tmp")), "no half-written file left"

    if (where, target) == ("train", "launcher"):  # resumed under DDP: the uninterrupted run's steps and LRs
        resumed = _Run(_ddp_args(ddp_data, runs, "--ckpt_path", "last"), tmp_path / "resume.txt")
        code, _ = resumed.finish()
        assert code == 0, resumed.stderr()[-3000:]
        run_dir = runs / "smoke" / "version_0"
        assert _progress(run_dir / "checkpoints" / "last.ckpt") == TOTAL
        got, want = lr_by_step(run_dir), lr_by_step(ddp_uninterrupted)
        assert sorted(got) == sorted(want) == list(range(TOTAL))
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-9), f"step {s}"
        assert (run_dir / "test_metrics.json").exists()


@pytest.mark.slow
def test_ddp_sigterm_during_the_final_test_stops_every_rank(ddp_data, tmp_path):
    runs, marker = tmp_path / "runs", tmp_path / "marker"
    run = _Run(_ddp_args(ddp_data, runs, "--trainer.max_epochs", "1", "--data.eval_batch_size", "2",
                         _slow("test", marker, step=0)), tmp_path / "stderr.txt")
    run.wait_for(marker)
    os.kill(run.proc.pid, signal.SIGTERM)
    code, seconds = run.finish()
    assert code == 143 and seconds < 30, run.stderr()[-3000:]
    assert _progress(runs / "smoke" / "version_0" / "checkpoints" / "last.ckpt") == STEPS_PER_EPOCH  # fit's own


@pytest.mark.slow
def test_ddp_killed_rank_stops_the_other_with_one_line(ddp_data, tmp_path):
    runs, marker = tmp_path / "runs", tmp_path / "marker"
    run = _Run(_ddp_args(ddp_data, runs, _slow("train", marker, step=7)), tmp_path / "stderr.txt")
    run.wait_for(marker)
    ckpt = runs / "smoke" / "version_0" / "checkpoints" / "last.ckpt"
    saved = ckpt.read_bytes()  # the end of epoch 0's
    rank1 = [pid for pid in run.ranks() if pid != run.proc.pid]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)  # as the out-of-memory killer does
    code, seconds = run.finish()
    err = run.stderr().strip().splitlines()
    assert code == 1 and seconds < 60, "\n".join(err[-30:])
    assert "another process of this 2-process run died or stopped answering" in err[-1], "\n".join(err[-30:])
    assert not any("Traceback" in line for line in err), "\n".join(err[-30:])
    assert ckpt.read_bytes() == saved and _progress(ckpt) == STEPS_PER_EPOCH  # nothing saved was touched
