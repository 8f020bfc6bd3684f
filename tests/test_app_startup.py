"""benchmarks/app_startup.py on the smoke run: the page answers, then every background step gets ready."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "app_startup.py"


@pytest.mark.slow
def test_app_startup_benchmark_times_the_page_and_every_tab(smoke_run):
    root, _, ckpt = smoke_run
    out = subprocess.run([sys.executable, str(BENCH), "--ckpt", str(ckpt), "--data.root", str(root),
                          "--projection", "pca", "--port", "7873", "--timeout", "300", "--page_repeats", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| cold") or line.startswith("| warm")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        seconds = [float(c.removesuffix(" s")) for c in cells[1:]]
        assert len(seconds) == 7 and seconds[0] <= seconds[1] and all(s > 0 for s in seconds)
    assert "CPU:" in out.stdout
    assert "first page over 2 more starts: median" in out.stdout
