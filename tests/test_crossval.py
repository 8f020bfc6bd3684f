"""K-fold cross-validation (`cifarlab audit`): the folds, and the out-of-sample probabilities it writes."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder

from cifarlab.audit import find_train_oof, write_train_oof
from cifarlab.commands.audit import audit_plan
from cifarlab.crossval import MARKER, finished_run
from cifarlab.data import CIFARDataModule, stratified_folds
from cifarlab.errors import ConfigError

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
# A tiny audit: 3 classes x 10 training images, every image trains (no validation), the final weights are tested.
AUDIT_FLAGS = ["--data.val_size", "0", "--checkpoint.monitor", "null", "--data.batch_size", "8"]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One ``cifarlab audit --folds 2`` on a tiny folder: ``(data_root, args, stdout)``."""
    from cifarlab.cli import main

    base = tmp_path_factory.mktemp("audit")
    root = make_image_folder(base / "data", n_train=10, n_test=3, seed=5)
    args = ["audit", "--config", SMOKE, "--folds", "2", "--data.root", str(root), "--run.dir", str(base / "runs"),
            *AUDIT_FLAGS]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return root, args, out.getvalue()


def test_folds_partition_the_training_set_in_class_proportion():
    labels = np.repeat(np.arange(4), [30, 31, 29, 10])
    fold = stratified_folds(labels, 3, seed=0)
    assert set(np.unique(fold)) == {0, 1, 2}
    for c in range(4):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1  # each class dealt evenly
    assert np.array_equal(fold, stratified_folds(labels, 3, seed=0))  # seeded
    assert not np.array_equal(fold, stratified_folds(labels, 3, seed=1))


@pytest.mark.parametrize("val_size", [0, 6])
def test_the_held_out_fold_never_trains_or_validates(image_folder, val_size):
    seen = []
    for k in range(2):
        dm = CIFARDataModule(root=str(image_folder), val_size=val_size, folds=2, fold=k)
        dm.setup("fit")
        train = dm.load_splits()["train"]
        heldout = dm.heldout_indices(train.labels)
        assert np.array_equal(heldout, dm.heldout_indices())  # the labels are only a shortcut
        used = {bytes(im) for im in dm.train_set.images}
        if dm.val_set is not None:
            used |= {bytes(im) for im in dm.val_set.images}
            assert len(dm.val_set) == val_size  # drawn from the images that are not held out
        assert not used & {bytes(train.images[i]) for i in heldout}
        assert len(dm.train_set) + (len(dm.val_set) if dm.val_set else 0) + len(heldout) == len(train.labels)
        assert np.array_equal(np.bincount(train.labels[heldout]), [12, 12, 12])  # half of each class's 24
        seen.append(heldout)
    assert sorted(np.concatenate(seen)) == list(range(len(train.labels)))  # every image held out exactly once


def test_one_fold_is_the_usual_split(image_folder):
    plain = CIFARDataModule(root=str(image_folder), val_size=6)
    folded = CIFARDataModule(root=str(image_folder), val_size=6, folds=1)
    plain.setup("fit")
    folded.setup("fit")
    assert np.array_equal(plain.train_set.images, folded.train_set.images)
    assert np.array_equal(plain.val_set.images, folded.val_set.images)
    assert folded.heldout_indices().size == 0


@pytest.mark.parametrize("folds, fold", [(0, 0), (2, 2), (3, -1)])
def test_bad_fold_settings_are_refused(folds, fold):
    with pytest.raises(ConfigError, match="--data.folds"):
        CIFARDataModule(folds=folds, fold=fold)


@pytest.mark.parametrize("args, message", [
    (["--config", SMOKE], "required: folds"),
    (["--config", SMOKE, "--folds", "1"], "2 or more"),
    (["--config", SMOKE, "--folds", "two"], 'Parser key "folds"'),
    (["--config", SMOKE, "--folds", "2", "--data.batch_size", "many"], 'Parser key "data.batch_size"'),
    (["--folds", "2"], "--config"),
    (["--config", SMOKE, "--folds", "2", "--data.fold", "1"], "--folds K only"),
    (["--config", SMOKE, "--folds", "2", "--ckpt_path", "x.ckpt"], "--ckpt_path"),
    (["--config", SMOKE, "--folds", "2", "--budget", "soon"], "not a duration"),
])
def test_bad_audit_arguments_are_one_line(args, message, capsys):
    from cifarlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["audit", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_each_fold_gets_its_share_of_the_budget_and_a_folder():
    fit_args, base, share = audit_plan(["--config", SMOKE, "--folds=4", "--budget", "10m", "--run.dir", "x",
                                        "--model.optimizer.lr", "0.1"], folds=4)
    assert (share, base) == (150, Path("x/audit-k4"))
    assert fit_args == ["--config", SMOKE, "--model.optimizer.lr", "0.1", "--budget", "150"]


def test_only_a_finished_fold_trained_with_the_same_flags_is_reused(tmp_path):
    def run(name, version, args, finished=True):
        folder = tmp_path / name / f"version_{version}"
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
        if finished:
            (folder / "test_metrics.json").write_text("{}")
            (folder / MARKER).write_text(json.dumps({"fit_args": args}))
        return folder / "checkpoints" / "last.ckpt"

    ours = run("smoke", 0, ["--config", "smoke.yaml"])
    run("fast", 0, ["--config", "fast.yaml"])  # another recipe's fold, in the same folder
    run("smoke", 1, ["--config", "smoke.yaml"], finished=False)  # interrupted
    assert finished_run(tmp_path, ["--config", "smoke.yaml"]) == ours
    assert finished_run(tmp_path, ["--config", "smoke.yaml", "--model.optimizer.lr", "1"]) is None


def test_audit_writes_out_of_sample_probabilities(audited):
    root, _, out = audited
    dm = CIFARDataModule(root=str(root))
    train = dm.load_splits()["train"]
    found = find_train_oof(dm.cache_dir, train.labels, train.classes)
    assert found is not None
    path, data = found
    assert path.name == f"train-oof-smoke-k2-{len(train.labels)}.npz"
    assert f"{path} ({len(train.labels)} training images, out-of-sample accuracy" in out
    assert data["probs"].dtype == np.float16 and data["probs"].shape == (len(train.labels), 3)
    assert np.allclose(data["probs"].astype(np.float32).sum(1), 1, atol=1e-2)
    # Row i is training image i, classified by the model of the one fold that did not train on it.
    assert np.array_equal(data["fold"], stratified_folds(train.labels, 2, 0))
    for k in range(2):
        assert np.array_equal(np.flatnonzero(data["fold"] == k),
                              CIFARDataModule(root=str(root), folds=2, fold=k).heldout_indices())
    assert np.array_equal(data["labels"], train.labels) and data["labels"].dtype == np.int64
    assert list(data["classes"]) == ["cat", "dog", "frog"]
    assert str(data["recipe"]) == "smoke" and int(data["folds"]) == 2
    ckpts = [Path(p) for p in data["ckpt_paths"]]
    assert all(p.is_absolute() and p.is_file() and f"fold{k}" in p.parts for k, p in enumerate(ckpts))
    # Another data set's labels or classes: not this file.
    assert find_train_oof(dm.cache_dir, train.labels[::-1], train.classes) is None
    assert find_train_oof(dm.cache_dir, train.labels, ["a", "b", "c"]) is None


def test_an_audit_run_again_reuses_its_folds(audited):
    from cifarlab.cli import main

    root, args, _ = audited
    ckpts = sorted(Path(args[args.index("--run.dir") + 1]).glob("audit-k2/fold*/smoke/version_*/checkpoints/last.ckpt"))
    assert len(ckpts) == 2
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    assert out.getvalue().count("reusing the finished run") == 2
    assert "training without" not in out.getvalue()
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes
    # Images relabelled since fold 1 was trained (here: its record of the labels altered): fold 1 trains again.
    marker = ckpts[1].parent.parent / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "labels_sha1": "other labels"}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    assert "fold 2/2: the training labels changed since" in out.getvalue()
    assert out.getvalue().count("reusing the finished run") == 1 and "training without fold 1" in out.getvalue()
    assert ckpts[0].stat().st_mtime_ns == mtimes[0]


def test_find_train_oof_skips_damaged_files_and_takes_the_newest(tmp_path):
    import os

    labels, classes = np.array([0, 1, 1]), ["a", "b"]
    assert find_train_oof(tmp_path, labels, classes) is None
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    old = write_train_oof(tmp_path, "old", probs, labels, np.array([0, 1, 0]), classes, [Path("a"), Path("b")])
    new = write_train_oof(tmp_path, "new", probs[:, ::-1], labels, np.array([0, 1, 0]), classes, [Path("a")] * 2)
    os.utime(old, ns=(1, 1))
    (tmp_path / "train-oof-broken-k2-3.npz").write_bytes(b"not a zip")
    path, data = find_train_oof(tmp_path, labels, classes)
    assert path == new and str(data["recipe"]) == "new" and int(data["folds"]) == 2
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_the_app_shows_the_training_sets_label_issues_from_the_audit(audited):
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cifarlab.app import CifarApp

    root, args, _ = audited
    ckpt = next(Path(args[args.index("--run.dir") + 1]).glob("audit-k2/fold0/*/version_0/checkpoints/last.ckpt"))
    app = CifarApp(ckpt, str(root), projection="pca").start()
    assert app.wait(timeout=300), app.prep.status()
    issues = app.audit.issues["train"]
    items, summary = app.label_issue_gallery("train", "any", 30)
    assert "2-fold cross-validation of smoke" in summary
    assert f"flags {len(issues.flagged)} of 30 train images" in summary
    assert len(items) == len(issues.flagged)
    assert all(caption.startswith("train #") for _, caption in items)
