"""Recipes leave the precision to the machine: bf16 only where it is measurably faster, fp32 elsewhere."""

import sys
from pathlib import Path

import pytest
import torch

from cifarlab import precision
from cifarlab.precision import Choice, choose_precision, cpu_precision, fastest_precision

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
CASCADE_LAKE = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2"}  # AVX-512, no bf16: emulated
SAPPHIRE_RAPIDS = CASCADE_LAKE | {"avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Pretend to be an x86 CPU with the given flags and probe result; count the probes."""
    probes = []

    def make(flags, speedup=2.0, arch="x86_64"):
        monkeypatch.setattr(precision, "cpu_info", lambda: ("Test CPU", flags))
        monkeypatch.setattr(precision.platform, "machine", lambda: arch)
        monkeypatch.setattr(precision, "CACHE_DIR", tmp_path / "cache")

        def probe():
            probes.append(1)
            return speedup
        monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
        return probes
    return make


def test_avx512_without_bf16_flags_is_fp32_without_probing(machine):
    probes = machine(CASCADE_LAKE, speedup=5.0)  # even a (wrong) fast probe must not be consulted
    choice = cpu_precision()
    assert choice.precision == "32-true" and "no native bf16" in choice.reason and not probes


@pytest.mark.parametrize(("speedup", "expected"), [(2.1, "bf16-mixed"), (1.05, "32-true"), (0.3, "32-true")])
def test_native_flags_are_confirmed_by_the_probe(machine, speedup, expected):
    probes = machine(SAPPHIRE_RAPIDS, speedup=speedup)
    choice = cpu_precision()
    assert choice.precision == expected and f"{speedup:.2f}x" in choice.reason and len(probes) == 1


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_unknown_flags_are_decided_by_the_probe(machine, arch):
    flags = None if arch == "x86_64" else {"fp", "asimd", "bf16"}  # no /proc/cpuinfo; or not x86
    probes = machine(flags, speedup=1.6, arch=arch)
    assert cpu_precision().precision == "bf16-mixed" and len(probes) == 1


def test_probe_result_is_cached_per_machine(machine, tmp_path):
    probes = machine(SAPPHIRE_RAPIDS, speedup=1.9)
    first, second = cpu_precision(), cpu_precision()
    assert first.precision == second.precision == "bf16-mixed"
    assert len(probes) == 1 and "cached probe" in second.reason
    assert len(list((tmp_path / "cache").glob("precision-*.json"))) == 1
    next((tmp_path / "cache").glob("precision-*.json")).write_text("{not json")  # damaged: measure again
    assert cpu_precision().precision == "bf16-mixed" and len(probes) == 2


def test_probe_measures_this_cpu_quickly():
    import time

    start = time.perf_counter()
    ratio = precision.probe_bf16_speedup()
    assert 0 < ratio < 100 and time.perf_counter() - start < 30  # ~0.4 s where bf16 is native


@pytest.mark.parametrize(("cuda", "cuda_bf16", "accelerator", "expected"), [
    (True, True, "auto", "bf16-mixed"),
    (True, False, "auto", "16-mixed"),
    (True, True, "cpu", "cpu-choice"),  # a GPU in the box does not matter for a CPU run
    (False, False, "auto", "cpu-choice"),
    (False, False, None, "cpu-choice"),
])
def test_choose_precision(monkeypatch, cuda, cuda_bf16, accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_precision", lambda: Choice("cpu-choice", "test"))
    assert choose_precision(accelerator).precision == expected
    assert fastest_precision(accelerator) == expected


@pytest.mark.parametrize("native", [True, False])
def test_recipe_without_precision_gets_the_machines_choice(native, image_folder, tmp_path, monkeypatch, capsys):
    from cifarlab.commands.fit import CifarLabCLI

    expected = "bf16-mixed" if native else "32-true"
    monkeypatch.setattr(precision, "cpu_precision", lambda: Choice(expected, "because of the test"))
    monkeypatch.setattr(sys, "argv", ["cifarlab"])  # LightningCLI warns when pytest's own argv is also present
    cli = CifarLabCLI(args=["--config", str(SMOKE), "--data.root", str(image_folder),
                            "--run.dir", str(tmp_path), "--trainer.accelerator", "cpu"], run=False)
    assert cli.trainer.precision == expected
    assert f"cifarlab: precision {expected} (because of the test;" in capsys.readouterr().out


def test_explicit_precision_wins(image_folder, tmp_path, monkeypatch):
    from cifarlab.commands.fit import CifarLabCLI

    def never():
        raise AssertionError("an explicit precision needs no choice")
    monkeypatch.setattr(precision, "cpu_precision", never)
    monkeypatch.setattr(sys, "argv", ["cifarlab"])
    cli = CifarLabCLI(args=["--config", str(SMOKE), "--data.root", str(image_folder),
                            "--run.dir", str(tmp_path), "--trainer.precision", "32-true"], run=False)
    assert cli.trainer.precision == "32-true"
