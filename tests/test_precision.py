"""Recipes leave the precision to the machine: bf16 only where it is native, fp32 where it is emulated."""

import sys
from pathlib import Path

import pytest
import torch

from cifarlab import precision
from cifarlab.precision import fastest_precision

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


@pytest.mark.parametrize(("cuda", "cuda_bf16", "cpu_bf16", "accelerator", "expected"), [
    (True, True, False, "auto", "bf16-mixed"),
    (True, False, True, "auto", "16-mixed"),
    (True, True, False, "cpu", "32-true"),  # a GPU in the box does not matter for a CPU run
    (True, True, True, "cpu", "bf16-mixed"),
    (False, False, True, "auto", "bf16-mixed"),
    (False, False, False, "auto", "32-true"),  # e.g. AVX2-only CPUs, where bf16 is emulated
    (False, False, False, None, "32-true"),
])
def test_fastest_precision(monkeypatch, cuda, cuda_bf16, cpu_bf16, accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: cpu_bf16)
    assert fastest_precision(accelerator) == expected


@pytest.mark.parametrize("native", [True, False])
def test_recipe_without_precision_gets_the_machines_choice(native, image_folder, tmp_path, monkeypatch, capsys):
    from cifarlab.cli import CifarLabCLI

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(sys, "argv", ["cifarlab"])  # LightningCLI warns when pytest's own argv is also present
    cli = CifarLabCLI(args=["--config", str(SMOKE), "--data.root", str(image_folder),
                            "--run.dir", str(tmp_path), "--trainer.accelerator", "cpu"], run=False)
    expected = "bf16-mixed" if native else "32-true"
    assert cli.trainer.precision == expected
    assert f"precision {expected}" in capsys.readouterr().out


def test_explicit_precision_wins(image_folder, tmp_path, monkeypatch):
    from cifarlab.cli import CifarLabCLI

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(sys, "argv", ["cifarlab"])
    cli = CifarLabCLI(args=["--config", str(SMOKE), "--data.root", str(image_folder),
                            "--run.dir", str(tmp_path), "--trainer.precision", "bf16-mixed"], run=False)
    assert cli.trainer.precision == "bf16-mixed"
