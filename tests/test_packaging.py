"""The package as a user installs it: a wheel, installed outside the repository, runs the main job by recipe name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import make_image_folder

import cifarlab
from cifarlab.recipes import packaged_recipes, resolve_config_args

REPO = Path(__file__).resolve().parents[1]


def test_recipes_resolve_by_name_by_path_and_fail_in_one_line(tmp_path, capsys):
    from cifarlab.cli import main

    assert {"fast", "seed", "smoke", "airbench94"} <= set(packaged_recipes())
    mine = tmp_path / "fast.yaml"  # a user's own file wins over the packaged recipe of the same name
    mine.write_text("seed_everything: 1\n")
    for given in ("fast", "fast.yaml", "elsewhere/configs/fast.yaml"):
        resolved = resolve_config_args(["fit", "--config", given])[2]
        assert Path(resolved).read_text() == (REPO / "configs" / "fast.yaml").read_text()
    assert resolve_config_args(["fit", f"--config={mine}"]) == ["fit", f"--config={mine}"]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "fastest"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no packaged recipe named 'fastest'" in err[0] and "fast, " in err[0]


def test_one_version_source():
    from importlib.metadata import version

    assert version("cifarlab") == cifarlab.__version__
    assert "version =" not in (REPO / "pyproject.toml").read_text().split("[project]")[1].split("\n[")[0].replace(
        'dynamic = ["version"]', "")


@pytest.mark.slow
def test_wheel_installed_outside_the_repo_runs_the_main_job(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, timeout=300)
    (wheel,) = dist.glob("cifarlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cifarlab/configs/fast.yaml" in names and "cifarlab/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # Installed on its own (the dependencies are this environment's), used from a folder far from the checkout.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    data = make_image_folder(work / "data")
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import cifarlab; print(cifarlab.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    # The README's main job as written (its configs/ path does not exist here: the packaged recipe is found).
    proc = subprocess.run([sys.executable, "-m", "cifarlab", "fit", "--config", "configs/fast.yaml", "--data.root",
                           str(data), "--trainer.max_epochs", "1", "--data.batch_size", "16",
                           "--data.eval_batch_size", "16", "--trainer.enable_progress_bar", "false"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (work / "runs" / "fast").glob("version_*")
    assert json.loads((run / "test_metrics.json").read_text())["num_images"] == 18
