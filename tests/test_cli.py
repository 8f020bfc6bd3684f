"""The CLI, in-process, on a synthetic ImageFolder: what a user runs, shrunk to seconds."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NARROW

from cifarlab.cli import main
from cifarlab.module import ImageClassifier

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
# The smoke recipe on the narrow network, 2 training batches and 1 validation batch (all 20 validation images) an
# epoch: the tests of the run's plumbing, not of the network.
SHORT = [*NARROW, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def _fit(root, run_dir, *extra):
    main(["fit", "--config", SMOKE, "--data.root", str(root), "--run.dir", str(run_dir), *SHORT, *extra])
    runs = sorted((run_dir / "smoke").glob("version_*"))
    return runs[-1]


def _recount(ckpt, root, split: str = "test") -> float:
    """The accuracy of the checkpoint's model on ``split`` (``test``, or the smoke recipe's 20 validation images),
    counted here: with the recipe's TTA on the test split, as fit's test runs it; the plain forward on validation."""
    from cifarlab.checkpoint import load_classifier
    from cifarlab.data import CIFARDataModule
    from cifarlab.inference import classify

    model = load_classifier(ckpt)
    dm = CIFARDataModule(root=str(root), val_size=20 if split == "val" else 0)
    dm.setup("fit" if split == "val" else "test")
    data = dm.val_set if split == "val" else dm.test_set
    x, y = data.batch(range(len(data)))
    with torch.no_grad():
        probs = model(x).softmax(1) if split == "val" else classify(model, x)
    return (probs.argmax(1) == y).float().mean().item()


def test_fit_writes_the_whole_run_directory(image_folder, tmp_path):
    run = _fit(image_folder, tmp_path / "runs", "--trainer.max_epochs", "2", "--trainer.precision", "32-true")
    for name in ("config.yaml", "metrics.csv", "test_metrics.json", "confusion_matrix.png", "curves.png",
                 "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard log"
    best = [p for p in (run / "checkpoints").glob("epoch*.ckpt")]
    assert len(best) == 1
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(metrics["per_class_acc"]) == {"cat", "dog", "frog"}
    assert math.isfinite(metrics["test_loss"])
    assert metrics["num_images"] == 18 and metrics["ckpt_path"] == str(best[0])
    assert metrics["test_acc"] == pytest.approx(_recount(best[0], image_folder))  # the tested checkpoint's accuracy
    # The test accuracy agrees with its own confusion matrix and per-class numbers.
    cm = torch.tensor(metrics["confusion_matrix"])
    assert metrics["test_acc"] == pytest.approx((cm.diag().sum() / cm.sum()).item())
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for col in ("train_loss_epoch", "train_acc", "val_loss", "val_acc", "train_img_per_s"):
        assert col in header


def test_checkpoint_alone_rebuilds_the_model(image_folder, tmp_path):
    from cifarlab.data import CIFARDataModule

    run = _fit(image_folder, tmp_path / "runs")
    ckpt = run / "checkpoints" / "last.ckpt"
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert model.hparams.num_classes == 3
    dm = CIFARDataModule(root=str(image_folder), val_size=20)
    dm.setup("fit")
    torch.testing.assert_close(model.normalize.mean, torch.tensor(dm.mean, dtype=torch.float32))
    # Predictions from the reloaded model equal those of `cifarlab test` on the same checkpoint.
    x, y = dm.test_set.batch(range(len(dm.test_set)))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    main(["test", "--config", SMOKE, "--data.root", str(image_folder), "--run.dir", str(tmp_path / "runs"), *NARROW,
          "--trainer.precision", "32-true", "--ckpt_path", str(ckpt)])
    tested = sorted((tmp_path / "runs" / "smoke").glob("version_*"))[-1]
    assert json.loads((tested / "test_metrics.json").read_text())["test_acc"] == pytest.approx(acc)


def test_same_seed_gives_same_validation_metrics(image_folder, tmp_path):
    import csv

    runs = [_fit(image_folder, tmp_path / f"runs{i}", "--trainer.precision", "32-true") for i in range(2)]
    val = []
    for run in runs:
        with open(run / "metrics.csv") as f:
            val.append([(row["val_loss"], row["val_acc"]) for row in csv.DictReader(f) if row["val_loss"]])
    assert val[0] and val[0] == val[1]


def test_validate_runs_on_the_validation_split(image_folder, tmp_path, capsys):
    run = _fit(image_folder, tmp_path / "runs")
    ckpt = run / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    main(["validate", "--config", SMOKE, "--data.root", str(image_folder), "--run.dir", str(tmp_path / "runs"),
          *NARROW, "--trainer.precision", "32-true", "--ckpt_path", str(ckpt)])
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "val_acc" in x]
    printed = float(line.replace("│", " ").replace("|", " ").split()[-1])
    assert printed == pytest.approx(_recount(ckpt, image_folder, "val"))  # the 20 validation images, not the test's


def test_ckpt_path_last_rebuilds_the_network_the_checkpoint_holds(image_folder, tmp_path):
    """`--ckpt_path last` reads the model's settings from the checkpoint it resolves to, as an explicit path does:
    the command without the run's --model flags tests the narrow network it trained, not the recipe's default."""
    run = _fit(image_folder, tmp_path / "runs")
    main(["test", "--config", SMOKE, "--data.root", str(image_folder), "--run.dir", str(tmp_path / "runs"),
          "--trainer.precision", "32-true", "--ckpt_path", "last"])
    tested = sorted((tmp_path / "runs" / "smoke").glob("version_*"))[-1]
    metrics = json.loads((tested / "test_metrics.json").read_text())
    assert Path(metrics["ckpt_path"]) == run / "checkpoints" / "last.ckpt"
    assert metrics["test_acc"] == pytest.approx(_recount(run / "checkpoints" / "last.ckpt", image_folder))


def test_lr_find_writes_plot_and_a_finite_suggestion(image_folder, tmp_path, capsys):
    out = tmp_path / "lr"
    # The smoke recipe's network: the narrow one's loss has not reached its minimum late enough in a sweep this short
    # (20 points: smoke.yaml's limit_train_batches; a suggestion needs 20, its minimum at the 15th or later).
    main(["lr-find", "--config", SMOKE, "--data.root", str(image_folder), "--num_iter", "40",
          "--data.batch_size", "2", "--out", str(out)])
    assert (out / "lr_find.png").stat().st_size > 10_000
    text = (out / "suggested_lr.yaml").read_text()
    lr = float(text.split("lr:")[1])
    assert math.isfinite(lr) and 1e-7 <= lr <= 10
    printed = capsys.readouterr().out
    assert f"--model.optimizer.lr {lr:.4g}" in printed


def test_lr_find_with_too_few_points_is_one_line(image_folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lr-find", "--config", SMOKE, "--data.root", str(image_folder), *NARROW, "--num_iter", "6"])
    assert exit_.value.code == 2
    assert "too few" in capsys.readouterr().err


def test_stats_prints_mean_std_and_writes_a_preview(image_folder, tmp_path, capsys):
    main(["stats", "--data.root", str(image_folder), "--data.val_size", "6", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "mean: [" in out and "std:  [" in out
    assert (tmp_path / "s" / "augmentations.png").exists()
    assert list((image_folder / ".cifarlab-cache").glob("stats-*.json"))


@pytest.mark.parametrize("args, message", [
    (["fit", "--config", SMOKE, "--data.root", "/nonexistent/cifar"], "does not exist"),
    (["stats", "--data.root", "/nonexistent/cifar"], "does not exist"),
    # the commands' own typed options: jsonargparse's errors, one line too, naming the option
    (["report", "--ckpt", "x.ckpt", "--projection", "umap"],
     'Parser key "projection": Expected a typing.Literal[\'tsne\', \'pca\']. Got value: umap'),
    (["report", "--ckpt", "x.ckpt", "--dup_threshold", "1.5"], "--dup_threshold 1.5: give a similarity in (0, 1]"),
    (["predict", "a.jpg", "--ckpt", "x.ckpt", "--top_k", "abc"], 'Parser key "top_k"'),
    (["predict", "a.jpg", "--ckpt", "x.ckpt", "--batch_size", "0"], 'Parser key "batch_size"'),
    (["predict", "--ckpt", "x.ckpt"], "cifarlab predict needs images"),
    (["export"], "the following arguments are required: ckpt (`cifarlab export --help` lists the options)"),
    (["export", "--ckpt", "x.ckpt", "--format", "tflite"], 'Parser key "format"'),
    (["app", "--ckpt", "x.ckpt", "--data.source", "web"], 'Parser key "data.source"'),
    (["app", "--ckpt", "x.ckpt", "--no_such_option", "1"], "unrecognized arguments: --no_such_option"),
    (["stats", "--num_images", "many"], 'Parser key "num_images"'),
    (["lr-find", "--config", SMOKE, "--num_iter", "-5"], 'Parser key "num_iter"'),
    (["lr-find", "--config", SMOKE, "--min_lr", "x"], "(`cifarlab lr-find --help` lists the options)"),
])
def test_bad_data_or_options_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifarlab: error:") and message in err[0]


@pytest.mark.parametrize("args, message", [
    (["--model.optimizer.name", "nadam"], 'Parser key "model.optimizer.name": Expected a typing.Literal'),
    (["--model.tta.level", "3"], 'Parser key "model.tta.level"'),
    (["--model.lr", "0.1"], "--model.lr is --model.optimizer.lr"),  # a flag of cifarlab before 2026-11-28
    (["--trainer.max_epochs", "abc"], 'Parser key "trainer.max_epochs"'),
    (["--no_such_option", "1"], "unrecognized arguments: --no_such_option"),
    (["--model.widths", "[8,16,32]"], "has fixed widths"),  # the smoke recipe's custom ResNet
    (["--data.augment.early_crop", "8", "--data.augment.early_crop_epochs", "2"], "between 16 and 32 pixels"),
    (["--model.tta.confident_at", "1.5"], "tta.confident_at is a probability in (0, 1]"),
    (["--model.activation", "silu"], "has a fixed activation"),  # the smoke recipe's custom ResNet
    (["--data.augment.backend", "albumentations", "--data.augment.brightness", "0.1"], "need --data.augment.backend"),
])
def test_bad_option_is_one_line_not_the_usage(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifarlab: error:") and message in err[0], err


def test_bad_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, "--data.root", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a train/test ImageFolder" in err[0], err


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning (~8 s); in-process just above
def test_console_script_reports_bad_data_without_traceback(tmp_path):
    (tmp_path / "photos").mkdir()
    proc = subprocess.run([sys.executable, "-m", "cifarlab.cli", "fit", "--config", SMOKE,
                           "--data.root", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a train/test ImageFolder" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("recipe, optimizer", [("fast", "muon"), ("airbench94", "sgd")])
def test_airbench_recipes_train_with_whitening_and_tta(image_folder, tmp_path, recipe, optimizer):
    run = tmp_path / "runs"
    main(["fit", "--config", str(REPO / "configs" / f"{recipe}.yaml"), "--data.root", str(image_folder),
          "--run.dir", str(run), "--data.batch_size", "16", "--data.val_size", "12", "--trainer.max_epochs", "2",
          "--trainer.limit_train_batches", "2", "--trainer.precision", "32-true",
          "--trainer.enable_progress_bar", "false"])
    (version,) = (run / recipe).glob("version_*")
    metrics = json.loads((version / "test_metrics.json").read_text())
    assert metrics["num_images"] == 18 and metrics["test_acc"] == pytest.approx(_recount(metrics["ckpt_path"],
                                                                                            image_folder))
    model = ImageClassifier.load_from_checkpoint(version / "checkpoints" / "last.ckpt", map_location="cpu")
    selective = {"fast": 0.8, "airbench94": 1.0}[recipe]  # fast.yaml views only the images it is unsure of
    assert model.hparams.arch == "airbench" and model.hparams.tta == {"level": 2, "confident_at": selective}
    assert model.optim.name == optimizer and model.hparams.optimizer["name"] == optimizer
    # The whitening filters were set from the data (not left at their random init) and stayed frozen.
    w = model.net.whiten.weight
    torch.testing.assert_close(w[:12], -w[12:])


def test_last_checkpoint_is_the_final_epoch_even_when_the_best_is_earlier(image_folder, tmp_path):
    # Checkpoints keep the best by val_loss (mode max: the worst loss, i.e. the first epoch here), while
    # last.ckpt must follow every epoch.
    run = _fit(image_folder, tmp_path / "runs", "--trainer.max_epochs", "3", "--checkpoint.monitor", "val_loss",
               "--checkpoint.mode", "max")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2
    fast = _fit(image_folder, tmp_path / "runs2", "--trainer.max_epochs", "2", "--checkpoint.monitor", "null")
    metrics = json.loads((fast / "test_metrics.json").read_text())
    assert "epoch01" in Path(metrics["ckpt_path"]).name  # no monitor: the final weights are tested


def test_missing_ckpt_path_is_one_line(image_folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--config", SMOKE, "--data.root", str(image_folder), "--ckpt_path", "/nonexistent/x.ckpt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ckpt_path /nonexistent/x.ckpt not found" in err[0]


def test_help_documents_the_augmentation_fields(capsys):
    """``--data.augment.help`` shows each AugmentConfig field's docstring, not only its type."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--data.augment.help", "AugmentConfig"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Progressive resizing (tensor back end only)" in out
    assert "Where augmentation runs: per sample (albumentations)" in out


def test_app_takes_gradios_server_variables_and_flags_win(monkeypatch, capsys):
    from cifarlab.commands.app import app_options

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    opts = app_options(["--ckpt", "x.ckpt"])
    assert (opts["host"], opts["port"]) == ("127.0.0.1", 7860)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8001")
    opts = app_options(["--ckpt", "x.ckpt"])
    assert (opts["host"], opts["port"]) == ("0.0.0.0", 8001)
    opts = app_options(["--ckpt", "x.ckpt", "--host", "127.0.0.1", "--port", "9000"])
    assert (opts["host"], opts["port"]) == ("127.0.0.1", 9000)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit) as exit_:
        main(["app", "--ckpt", "x.ckpt"])
    assert exit_.value.code == 2
    assert "GRADIO_SERVER_PORT='http' is not a port number" in capsys.readouterr().err


def test_default_root_dir_is_where_the_run_goes(image_folder, tmp_path, capsys):
    where = tmp_path / "lightning_root"
    main(["fit", "--config", SMOKE, "--data.root", str(image_folder), *SHORT, "--trainer.default_root_dir",
          str(where)])
    assert (where / "smoke" / "version_0" / "test_metrics.json").exists()
    assert list((where / "smoke" / "version_0" / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()  # the first run's output
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, "--data.root", str(image_folder), "--trainer.default_root_dir", str(where),
              "--run.dir", str(tmp_path / "elsewhere")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "both say where the run goes" in err[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings: Linux only")
def test_malloc_tuning_is_for_training_and_can_be_switched_off(monkeypatch):
    import ctypes

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(param)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    from cifarlab.memory import tune_malloc

    tune_malloc()
    assert calls == [-4, -1, -2]  # mmap max, trim threshold, top pad
    calls.clear()
    tune_malloc(server=True)
    assert calls == [-8]  # arena max
    calls.clear()
    monkeypatch.setenv("CIFARLAB_MALLOC_TUNING", "0")
    tune_malloc()
    assert calls == []


def test_an_added_logger_keeps_the_run_directory_and_its_files(image_folder, tmp_path):
    extra = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(tmp_path / "mine"), "name": "exp"}})
    run = _fit(image_folder, tmp_path / "runs", "--trainer.max_epochs", "1", "--trainer.logger", extra)
    for name in ("metrics.csv", "test_metrics.json", "curves.png"):
        assert (run / name).exists(), name
    assert list((tmp_path / "mine" / "exp").glob("version_*/metrics.csv"))  # the added logger got the metrics too


def test_confusion_matrix_and_mistakes_go_to_tensorboard(image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # An untrained model (LR ~0) gets many test images wrong: the mistakes grid has something to show.
    main(["fit", "--config", str(SMOKE), "--data.root", str(image_folder), "--run.dir", str(tmp_path), *SHORT,
          "--model.optimizer.lr", "1e-9", "--trainer.limit_train_batches", "1"])
    run = tmp_path / "smoke" / "version_0"
    assert json.loads((run / "test_metrics.json").read_text())["test_acc"] < 1
    images, texts = {}, set()
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        images |= {tag: acc.Images(tag)[-1] for tag in acc.Tags()["images"]}
        texts |= set(acc.Tags()["tensors"])
    assert {"test/confusion_matrix", "test/mistakes"} <= set(images)
    assert all(im.width > 100 and im.height > 100 for im in images.values())  # figures, not 32x32 thumbnails
    assert any(tag.startswith("test/mistakes") for tag in texts)  # the captions as text too


def test_a_failing_tensorboard_writer_only_warns(image_folder, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SummaryWriter, "add_image", broken)
    with pytest.warns(UserWarning, match="not logged to TensorBoard"):
        main(["fit", "--config", str(SMOKE), "--data.root", str(image_folder), "--run.dir", str(tmp_path), *SHORT,
              "--trainer.limit_train_batches", "1"])
    run = tmp_path / "smoke" / "version_0"
    for name in ("test_metrics.json", "confusion_matrix.png", "curves.png"):
        assert (run / name).exists(), name


@pytest.mark.parametrize("command", ["app", "report", "predict", "export"])
def test_checkpoint_commands_take_config_files_and_print_them(command, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "opts.yaml"
    cfg.write_text("ckpt: /models/a.ckpt\n" + ("data:\n  root: /data/x\n" if command in ("app", "report") else ""))
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", str(cfg), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["ckpt"] == "/models/a.ckpt"
    if command in ("app", "report"):
        assert printed["data"]["root"] == "/data/x"
    # A flag after the file wins; the printed YAML is itself a valid --config.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(printed))
    with pytest.raises(SystemExit):
        main([command, "--config", str(again), "--ckpt", "/models/b.ckpt", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["ckpt"] == "/models/b.ckpt"


def test_a_fit_recipe_as_config_gives_the_app_its_data_root(tmp_path, capsys):
    import yaml

    run_config = tmp_path / "config.yaml"  # what a run writes: every fit section, data.root among them
    run_config.write_text(yaml.safe_dump({"seed_everything": 0, "trainer": {"max_epochs": 3},
                                          "model": {"arch": "airbench"}, "data": {"root": "/data/y",
                                                                                  "batch_size": 512}}))
    with pytest.raises(SystemExit) as exit_:
        main(["app", "--config", str(run_config), "--ckpt", "/m.ckpt", "--print_config"])
    assert exit_.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"] == "/data/y"


def test_an_unknown_option_in_a_config_file_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ckpt: a.ckpt\nport_number: 80\n")
    with pytest.raises(SystemExit) as exit_:
        main(["app", "--config", str(cfg)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown option 'port_number'" in err[0] and "port" in err[0]


def _key(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# Every command, dry: no data set, checkpoint or image exists; `--print_config` prints the options, recipe included.
@pytest.mark.parametrize("argv, expected", [
    (["fit", "--config", "smoke", "--trainer.max_epochs", "3"], {"trainer.max_epochs": 3, "run.name": "smoke"}),
    (["stats", "--config", "smoke", "--num_images", "8"], {"num_images": 8, "out": None, "run.name": "smoke"}),
    (["lr-find", "--config", "smoke", "--num_iter", "50"], {"num_iter": 50, "min_lr": 1e-7,
                                                            "model.arch": "custom_resnet"}),
    (["audit", "--config", "smoke", "--folds", "3"], {"folds": 3, "model.arch": "custom_resnet"}),
    (["app", "--ckpt", "/no/m.ckpt", "--port", "8001"], {"ckpt": "/no/m.ckpt", "port": 8001, "data.source": "auto"}),
    (["predict", "/no/a.jpg", "--ckpt", "/no/m.ckpt"], {"images": ["/no/a.jpg"], "top_k": 3, "device": "auto"}),
    (["report", "--ckpt", "/no/m.ckpt", "--data.root", "/no/data"], {"data.root": "/no/data", "count": 32}),
    (["export", "--ckpt", "/no/m.ckpt", "--tta", "true"], {"tta": True, "opset": 18, "format": "onnx"}),
    (["export", "--ckpt", "/no/m.ckpt", "--tta"], {"tta": True}),  # a switch, as well
])
def test_every_command_prints_its_configuration(argv, expected, capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in expected.items():
        assert _key(printed, key) == value, key


@pytest.mark.parametrize("command, own", [("stats", "num_images: 8"), ("lr-find", "num_iter: 40"),
                                          ("audit", "folds: 4")])
def test_recipe_commands_read_their_own_options_from_config_files_too(command, own, tmp_path, capsys):
    import yaml

    mine = tmp_path / "mine.yaml"
    mine.write_text(f"{own}\ndata:\n  batch_size: 2\n")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", "smoke", "--config", str(mine), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    key, value = own.split(": ")
    assert printed[key] == int(value)
    assert printed["data"]["batch_size"] == 2 and printed["model"]["arch"] == "custom_resnet"  # the recipe, then mine


@pytest.mark.parametrize("command, option, doc", [
    ("stats", "--num_images", "Images in the preview grid. (type: PositiveInt, default: 32)"),
    ("lr-find", "--num_iter", "Batches in the sweep (the LR grows exponentially). (type: PositiveInt, default: 200)"),
    ("audit", "--folds", "Cross-validation folds, 2 or more (each trains the recipe once). (required, type: int)"),
    ("app", "--data.root", "Test data (ImageFolder root); default: the data the checkpoint was trained on."),
    ("predict", "--top_k", "Classes per image, most probable first. (type: PositiveInt, default: 3)"),
    ("report", "--projection", "How the embedding map is drawn (t-SNE: clearer clusters; PCA: faster). (type: "
                               "Literal['tsne', 'pca'], default: tsne)"),
    ("export", "--opset", "ONNX opset version. (type: int, default: 18)"),
])
def test_help_lists_each_typed_option_with_its_docstring(command, option, doc, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"usage: cifarlab {command}" in out
    assert f"{option} " in out and doc in out
    if command in ("stats", "lr-find", "audit"):  # the recipe's options come with the command's own
        assert "--trainer.max_epochs" in out and "Stop training once this number of epochs is reached." in out


def test_parse_errors_become_one_line_naming_the_field():
    from cifarlab.commands.parsing import legacy_hint, summarize_parse_error

    # What jsonargparse says for `--model.tta.level 3`: the settings group is a union with None.
    union = ('Parser key "model.tta":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class '
             "'cifarlab.settings.TTAConfig'>, <class 'NoneType'>]\n  Errors:\n    - Problem with given class_path "
             "'cifarlab.settings.TTAConfig':\n        Parser key \"level\":\n          Expected a typing.Literal[0, 1, "
             "2]. Got value: 3\n    - Expected a <class 'NoneType'>\n  Given value type: <class 'NestedArg'>")
    expected = 'Parser key "model.tta.level": Expected a typing.Literal[0, 1, 2]. Got value: 3'
    assert summarize_parse_error(union) == expected
    plain = 'Parser key "top_k":\n  Not of type PositiveInt: 0 does not conform to restriction v>0'
    assert summarize_parse_error(plain) == " ".join(plain.split("\n  "))  # one line, nothing left out
    # A model argument of older cifarlab versions: as a flag, and as a key of a YAML file.
    assert "--model.lr is --model.optimizer.lr" in legacy_hint("unrecognized arguments: --model.lr 0.1")
    assert "--model.lr is --model.optimizer.lr" in legacy_hint("Group 'model' does not accept option 'lr'")
    assert legacy_hint("unrecognized arguments: --model.optimizer.lr 0.1") == ""
    assert legacy_hint("unrecognized arguments: --no_such_option 1") == ""


def test_a_config_file_that_is_not_a_mapping_or_not_yaml_is_one_line(tmp_path, capsys):
    for text, message in (("- a\n- b\n", "must be a YAML mapping"), ("ckpt: [unclosed\n", "is not valid YAML")):
        cfg = tmp_path / "opts.yaml"
        cfg.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            main(["export", "--config", str(cfg)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def _imports() -> dict[str, set[str]]:
    """Each module of cifarlab -> the cifarlab modules it imports, at the top or inside functions."""
    import ast

    src = REPO / "src" / "cifarlab"
    names = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {dep for dep in found if dep in names and dep != name}
    return graph


def test_commands_sit_on_top_and_no_module_imports_itself_back():
    graph = _imports()
    front = {"cifarlab.cli", "cifarlab.__main__"} | {m for m in graph if m.startswith("cifarlab.commands")}
    below = {m: deps & front for m, deps in graph.items() if m not in front and deps & front}
    assert not below, f"modules under the commands import them: {below}"
    cycles = []
    for start in graph:  # a path from a module's imports back to it is a cycle
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo += graph[module]
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_the_command_line_imports_no_optional_extra():
    code = "import sys, cifarlab.cli; print(sorted(m for m in ('gradio', 'pytorch_grad_cam', 'cleanlab', 'onnx') " \
           "if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_a_run_stopped_by_sigterm_exits_143_with_one_line(monkeypatch, capsys):
    """Lightning's SIGTERMException is a SystemExit: the command line turns it into 128 + SIGTERM and one line."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import cifarlab.commands.fit as fit

    def stopped_run(argv, start=None, description=None):
        raise SIGTERMException()

    monkeypatch.setattr(fit, "main", stopped_run)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "smoke"])
    assert exit_.value.code == 143
    assert capsys.readouterr().err.strip() == "cifarlab: stopped by SIGTERM"
    assert fit.stopped(SystemExit(2)) == (None, 1)  # any other exit is left as it is
