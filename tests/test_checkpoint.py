"""One Checkpoint: grouped model settings, and checkpoints written with flat arguments (before 2026-11-28) still
load in every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifarlab.checkpoint import Checkpoint, load_classifier
from cifarlab.cli import main
from cifarlab.data import CIFARDataModule
from cifarlab.errors import CifarlabError
from cifarlab.module import ImageClassifier
from cifarlab.settings import LEGACY_NAMES, migrate_hparams

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"

# The fast recipe's model section as cifarlab before 2026-11-28 wrote it (flat), and what it means today (grouped).
FLAT = {"arch": "airbench", "logit_scale": 1 / 9, "optimizer": "muon", "muon_lr": 0.24, "muon_momentum": 0.6,
        "muon_ns_steps": 3, "lr": 1.65619, "momentum": 0.85, "nesterov": True, "weight_decay": 2.41518e-3,
        "bn_lr_scale": 64.0, "whiten_bias_lr_scale": 64.0, "whiten_bias_decay": True, "whiten_bias_epochs": 3,
        "scheduler": "onecycle", "pct_start": 0.0, "div_factor": 1.0, "final_div_factor": 1e4, "three_phase": False,
        "anneal_strategy": "linear", "cycle_momentum": False, "label_smoothing": 0.2, "tta_level": 2}


def flatten(hparams: dict) -> dict:
    """Grouped hyperparameters back in the flat form of cifarlab before 2026-11-28."""
    where = {group_field: old for old, group_field in LEGACY_NAMES.items()}
    flat = {k: v for k, v in hparams.items() if k not in ("optimizer", "schedule", "whitening", "tta")}
    for group in ("optimizer", "schedule", "whitening", "tta"):
        for name, value in hparams[group].items():
            if (group, name) in where:  # fields added since (tta.confident_at) had no flat name
                flat[where[(group, name)]] = value
    return flat


def test_flat_arguments_move_into_their_groups():
    grouped = migrate_hparams(FLAT)
    model = ImageClassifier(**grouped)
    assert model.optim.name == "muon" and model.optim.lr == 1.65619 and model.optim.muon_lr == 0.24
    assert model.schedule.final_div_factor == 1e4 and not model.schedule.cycle_momentum
    assert model.whitening.bias_decay and model.whitening.bias_lr_scale == 64.0 and model.tta.level == 2
    assert model.hparams.label_smoothing == 0.2 and model.hparams.tta == {"level": 2, "confident_at": 1.0}
    assert migrate_hparams(dict(model.hparams)) == dict(model.hparams)  # grouped ones are left alone
    assert flatten(dict(model.hparams))["lr"] == 1.65619


def test_a_group_with_an_unknown_field_is_one_clear_error():
    with pytest.raises(CifarlabError, match=r"unknown OptimizerConfig field\(s\) \['betas'\]"):
        ImageClassifier(optimizer={"name": "adam", "betas": [0.9, 0.99]})


def legacy_copy(ckpt: Path, out: Path) -> Path:
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"] = flatten({k: v for k, v in raw["hyper_parameters"].items() if not k.startswith("_")})
    assert "lr" in raw["hyper_parameters"] and "optimizer" in raw["hyper_parameters"]
    torch.save(raw, out)
    return out


def test_a_checkpoint_with_flat_arguments_loads_in_every_command(smoke_run, tmp_path, capsys):
    root, run, best = smoke_run
    old = legacy_copy(best, tmp_path / "old.ckpt")
    new = load_classifier(best)
    for model in (load_classifier(old), ImageClassifier.load_from_checkpoint(old).eval()):
        assert dict(model.hparams) == dict(new.hparams)
        x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            torch.testing.assert_close(model(x), new(x))
    assert Checkpoint.read(old).hparams["optimizer"]["name"] == "adam"

    # `test --ckpt_path` reads the model's settings from the checkpoint through Checkpoint, not from the raw file.
    main(["test", "--config", str(SMOKE), "--data.root", str(root), "--run.dir", str(tmp_path / "runs"),
          "--ckpt_path", str(old), "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false"])
    metrics = json.loads(next((tmp_path / "runs").glob("smoke/version_*/test_metrics.json")).read_text())
    dm = CIFARDataModule(root=str(root), val_size=0)
    dm.setup("test")
    x, y = dm.test_set.batch(range(len(dm.test_set)))
    with torch.no_grad():
        expected = (new(x).argmax(1) == y).float().mean().item()  # the network of today's checkpoint, counted here
    assert metrics["num_images"] == len(y) and metrics["test_acc"] == pytest.approx(expected)
    image = next((root / "test").glob("*/*.png"))
    capsys.readouterr()
    main(["predict", str(image), "--ckpt", str(old), "--top_k", "1"])
    assert json.loads(capsys.readouterr().out)["top_k"][0]["class"] in new.class_names


def test_a_checkpoint_from_before_new_arguments_keeps_its_behaviour_under_a_newer_recipe(smoke_run, tmp_path):
    """fast.yaml now names SiLU and selective TTA; a fast-recipe checkpoint written before those arguments existed
    (GELU, TTA for every image) must be rebuilt as it was trained, not with the recipe's new values."""
    import yaml

    root, _, _ = smoke_run
    model = ImageClassifier(arch="airbench", class_names=["a", "b", "c"], logit_scale=1 / 9, tta={"level": 2})
    hparams = {k: v for k, v in model.hparams.items() if k not in ("activation", "bn_momentum")}
    hparams["tta"] = {"level": 2}  # before tta.confident_at
    old = tmp_path / "before.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "2.6.6"}, old)
    migrated = Checkpoint.read(old).hparams
    assert migrated["activation"] is None and migrated["tta"] == {"level": 2, "confident_at": 1.0}
    main(["test", "--config", "fast", "--data.root", str(root), "--run.dir", str(tmp_path / "runs"),
          "--ckpt_path", str(old), "--trainer.enable_progress_bar", "false"])
    (saved,) = (tmp_path / "runs").glob("fast/version_*/hparams.yaml")
    used = yaml.safe_load(saved.read_text())  # the model's top-level arguments as the command built it
    assert used["activation"] is None and used["bn_momentum"] is None  # not the recipe's silu and 0.5566
    assert load_classifier(old).net.block1.act.__class__.__name__ == "GELU"


def test_fit_continues_only_the_same_network(smoke_run, tmp_path, capsys):
    root, run, best = smoke_run
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "fast", "--data.root", str(root), "--run.dir", str(tmp_path), "--ckpt_path",
              str(best)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another network (arch=custom_resnet, 3 classes)" in err[0], err


def test_a_checkpoint_whose_settings_do_not_parse_is_one_line(smoke_run, tmp_path, capsys):
    root, run, best = smoke_run
    raw = torch.load(best, weights_only=True)
    raw["hyper_parameters"]["optimizer"]["name"] = "nadam"
    torch.save(raw, tmp_path / "odd.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--config", str(SMOKE), "--data.root", str(root), "--run.dir", str(tmp_path),
              "--ckpt_path", str(tmp_path / "odd.ckpt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "odd.ckpt: its model settings do not fit" in err[0] and "nadam" in err[0], err
    with pytest.raises(CifarlabError, match="OptimizerConfig.name = .nadam.: choose one of"):
        load_classifier(tmp_path / "odd.ckpt")


def test_weights_digest_names_the_weights_not_the_file(tmp_path):
    from cifarlab.checkpoint import weights_digest

    model = ImageClassifier(arch="airbench", class_names=["a", "b", "c"])
    state = model.state_dict()
    torch.save({"state_dict": state}, tmp_path / "w.ckpt")
    loaded = torch.load(tmp_path / "w.ckpt", weights_only=True)["state_dict"]
    assert weights_digest(loaded) == weights_digest(state)  # another file, the same weights
    changed = {**state, "net.fc.weight": state["net.fc.weight"] + 1e-3}
    assert weights_digest(changed) != weights_digest(state)
    assert weights_digest({k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}) != \
        weights_digest(state)


def test_module_and_checkpoint_import_one_way():
    """checkpoint.py builds on module.py; module.py reads its own checkpoints (no import of checkpoint, even in a
    function)."""
    import ast

    import cifarlab.module as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert "cifarlab.checkpoint" not in imported
