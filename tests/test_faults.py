"""Faults: interrupted runs resume exactly, unsafe or mismatched checkpoints and unwritable run directories are
refused before anything runs, and bad data never damages what was already saved."""

from __future__ import annotations

import csv
import hashlib
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

from cifarlab.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
STEPS_PER_EPOCH = 10  # 3 classes x 32 images - 12 held out = 84 -> 10 batches of 8 (last one dropped)
EPOCHS = 3


def _args(root: Path, runs: Path, *extra: str) -> list[str]:
    return ["fit", "--config", SMOKE, "--data.root", str(root), "--run.dir", str(runs), *NARROW,
            "--trainer.precision", "32-true", "--trainer.max_epochs", str(EPOCHS), "--trainer.log_every_n_steps", "1",
            "--data.batch_size", "8", "--data.val_size", "12", *extra]


def _ckpt_progress(path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["epoch"], ckpt["global_step"]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("resume") / "data", n_train=32)


@pytest.fixture(scope="module")
def uninterrupted(resume_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("uninterrupted")
    main(_args(resume_data, runs, "--checkpoint.save_top_k", "-1"))  # every epoch's checkpoint, not the best only
    return runs / "smoke" / "version_0"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_run_resumes_with_same_steps_and_lr_schedule(resume_data, uninterrupted, tmp_path, signum):
    runs = tmp_path / "runs"
    marker = tmp_path / "mid-epoch"
    slow = json.dumps({"class_path": "fault_helpers.SlowAfter", "init_args": {"step": 14, "marker": str(marker)}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "cifarlab.cli", *_args(resume_data, runs),
                             f"--trainer.callbacks+={slow}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never reached step 14: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "an interrupted run must not exit as a success"
    assert "Traceback" not in err, err[-2000:]

    run = runs / "smoke" / "version_0"
    epoch, step = _ckpt_progress(run / "checkpoints" / "last.ckpt")
    assert 14 <= step < EPOCHS * STEPS_PER_EPOCH and step % STEPS_PER_EPOCH != 0, "not saved mid-epoch"
    assert epoch == step // STEPS_PER_EPOCH
    before = lr_by_step(run)
    assert max(before) == step - 1  # the LR of every step taken before the signal is on disk

    main(_args(resume_data, runs, "--ckpt_path", "last"))

    assert not (runs / "smoke" / "version_1").exists(), "a resumed run continues in its own folder"
    assert _ckpt_progress(run / "checkpoints" / "last.ckpt") == \
        _ckpt_progress(uninterrupted / "checkpoints" / "last.ckpt") == (EPOCHS - 1, EPOCHS * STEPS_PER_EPOCH)
    resumed, reference = lr_by_step(run), lr_by_step(uninterrupted)
    # OneCycle continued from its state: every step's LR is the uninterrupted run's (it did not restart at the peak
    # or the warm-up), and the logs from before the interruption are still there.
    assert sorted(resumed) == sorted(reference) == list(range(len(reference)))
    for s in reference:
        assert resumed[s] == pytest.approx(reference[s], rel=1e-9), f"step {s}"
    assert (run / "test_metrics.json").exists()


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(uninterrupted, resume_data, tmp_path):
    """Resumed from the end of epoch 1 (that epoch's checkpoint): RNG, optimizer and schedule are restored, so
    epoch 2's validation metrics are the uninterrupted run's, to the last digit."""
    ckpt = next((uninterrupted / "checkpoints").glob("epoch01-*.ckpt"))
    runs = tmp_path / "runs"
    main(_args(resume_data, runs, "--ckpt_path", str(ckpt)))

    def val_rows(run):
        with open(run / "metrics.csv", newline="") as f:
            return {int(row["epoch"]): (row["val_acc"], row["val_loss"]) for row in csv.DictReader(f) if row["val_acc"]}

    resumed = val_rows(runs / "smoke" / "version_0")
    assert list(resumed) == [EPOCHS - 1]
    assert resumed[EPOCHS - 1] == val_rows(uninterrupted)[EPOCHS - 1]


def test_resume_without_any_checkpoint_is_one_line(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, "--data.root", str(image_folder), "--run.dir", str(tmp_path / "runs"),
              "--ckpt_path", "last"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint under" in err[0]


# --- checkpoints handed to fit/validate/test
class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_pickle_payload_checkpoint_is_refused_by_lightning_commands(smoke_run, tmp_path, monkeypatch, capsys,
                                                                      command):
    root, _, ckpt = smoke_run
    monkeypatch.chdir(tmp_path)
    data = torch.load(ckpt, weights_only=True)
    data["evil"] = _Payload()
    torch.save(data, tmp_path / "evil.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", SMOKE, "--data.root", str(root), "--run.dir", str(tmp_path / "runs"),
              "--ckpt_path", str(tmp_path / "evil.ckpt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load" in err[0]
    assert not (tmp_path / "PWNED").exists()
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "nothing may run"


@pytest.mark.parametrize("change, message", [
    (["--model.arch", "airbench"], "(arch=custom_resnet, 3 classes); this run builds arch=airbench"),
    (["--data.root", "{four_classes}"], "this run builds arch=custom_resnet, 4 classes"),
])
def test_checkpoint_of_another_network_or_class_count_is_one_line(smoke_run, tmp_path, capsys, change, message):
    root, _, ckpt = smoke_run
    four = make_image_folder(tmp_path / "four", classes=("a", "b", "c", "d"), n_train=8, n_test=2)
    change = [c.format(four_classes=four) for c in change]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, "--data.root", str(root), "--run.dir", str(tmp_path / "runs"),
              "--ckpt_path", str(ckpt), *change])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another network" in err[0] and message in err[0], err


# --- disk trouble
def test_unwritable_run_directory_is_reported_before_training(image_folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, "--data.root", str(image_folder), "--run.dir", str(blocker / "runs")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the run directory" in err[0] and str(blocker) in err[0]
    assert not (image_folder / ".cifarlab-cache").exists(), "reported before any data work"
    assert time.perf_counter() - start < 30


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_directory_is_reported_before_training(image_folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        with pytest.raises(SystemExit):
            main(["fit", "--config", SMOKE, "--data.root", str(image_folder), "--run.dir", str(runs)])
    finally:
        runs.chmod(0o700)
    assert "cannot write the run directory" in capsys.readouterr().err


# --- bad data never damages what is already there
def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _break(root: Path, fault: str) -> str:
    """Damage the folder one way; returns a fragment the one-line error must contain."""
    import shutil

    if fault == "missing root":
        shutil.move(root, root.with_name("moved"))
        return "does not exist"
    if fault == "no train/test":
        shutil.move(root / "test", root / "testing")
        return "no test/ folder"
    if fault == "empty class":
        for split in ("train", "test"):
            (root / split / "zebra").mkdir()
        return "zebra holds no images"
    if fault == "corrupt image":
        (root / "train" / "dog" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        return "0003.png"
    if fault == "non-image file":
        (root / "train" / "cat" / "notes.jpg").write_text("shopping list")
        return "notes.jpg"
    if fault == "class lists differ":
        shutil.rmtree(root / "test" / "frog")
        return "only in train: ['frog']"
    raise ValueError(fault)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A data folder, a finished run and its decode cache (kept outside the folder, so every fault reaches it)."""
    base = tmp_path_factory.mktemp("saved")
    root = make_image_folder(base / "data")
    main(["fit", "--config", SMOKE, "--data.root", str(root), "--run.dir", str(base / "runs"),
          "--data.cache_dir", str(base / "cache"), *NARROW, "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"])
    assert list((base / "runs").rglob("*.ckpt")) and list((base / "cache").iterdir())  # something to keep safe
    return base


@pytest.mark.parametrize("fault", ["missing root", "no train/test", "empty class", "corrupt image",
                                   "non-image file", "class lists differ"])
def test_bad_data_is_one_line_and_keeps_runs_and_caches(saved_run, tmp_path, capsys, fault):
    import shutil

    base = tmp_path / "copy"
    shutil.copytree(saved_run, base)  # copy2 keeps mtimes: the cache stays valid for the copied folder
    root, runs, cache = base / "data", base / "runs", base / "cache"
    saved_runs, saved_cache = _digest(runs), _digest(cache)
    message = _break(root, fault)
    capsys.readouterr()
    # In process (a traceback would fail the test as an exception); `python -m cifarlab` exits 2 the same way.
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, "--data.root", str(root), "--run.dir", str(runs), "--data.cache_dir",
              str(cache)])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()
    assert err and err[-1].startswith("cifarlab: error:") and message in err[-1], stderr[-1500:]
    assert "Traceback" not in stderr
    assert _digest(runs) == saved_runs and _digest(cache) == saved_cache


def test_skip_corrupt_leaves_bad_files_out_with_a_count(image_folder, capsys):
    from cifarlab.data import CIFARDataModule

    (image_folder / "train" / "dog" / "0003.png").write_bytes(b"garbage")
    (image_folder / "train" / "cat" / "notes.txt.jpg").write_text("not an image")
    dm = CIFARDataModule(root=str(image_folder), val_size=6, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\)"):
        dm.prepare_data()
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 3 * 24 - 1  # the junk .jpg is extra; the broken dog is out
    # The same cache read without the option stops at the file, as if it had never been skipped.
    from cifarlab.errors import DataError

    with pytest.raises(DataError, match=r"cat/notes\.txt\.jpg"):  # the first skipped file, in sorted order
        CIFARDataModule(root=str(image_folder), val_size=6).setup("fit")
