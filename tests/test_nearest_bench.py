"""benchmarks/nearest.py runs on tiny sizes and finds the same neighbours with every method."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_nearest_benchmark_times_every_method_and_they_agree():
    proc = subprocess.run([sys.executable, "benchmarks/nearest.py", "--n_query", "40", "--n_base", "300", "--dim", "16",
                           "--k", "1", "4", "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("CPU: ") and "40 queries x 300 base x 16-d" in out
    rows = re.findall(r"^\| (.+?) \| (\d+) \| ([\d.]+) \| ([\d.]+)% \| (\S+) \|$", out, re.M)
    names = ["cifarlab (torch)", "scikit-learn"] + (["faiss IndexFlatIP"] if importlib.util.find_spec("faiss") else [])
    assert [(name, k) for name, k, *_ in rows] == [(name, k) for k in ("1", "4") for name in names], out
    for name, k, _, same, gap in rows:
        # Random features have no near-ties at this size: every method must return the same neighbours.
        assert float(same) == 100.0 and float(gap) < 1e-4, (name, k, same, gap)
