"""Shared fixtures: tiny synthetic ImageFolder trees, made in a temp dir per test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
THREADS = torch.get_num_threads()

SHARED_TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
# Flags for a fit that tests the plumbing (runs, checkpoints, errors, schedules), not the network: airbench's layout
# at 8/16/16 channels, about 11k weights against the custom ResNet's 6.5M, so a step takes milliseconds on a CPU.
NARROW = ["--model.arch", "airbench", "--model.widths", "[8,16,16]"]


def make_image_folder(root: Path, classes=("cat", "dog", "frog"), n_train: int = 24, n_test: int = 6,
                      size: int = 32, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/<i>.png``; each class gets its own base colour so it is learnable."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 181 + 40) % 256])
            for i in range(n):
                noise = rng.integers(-40, 40, (size, size, 3))
                img = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """One intra-op thread for the fast tests (set before any fixture, session ones such as ``smoke_run`` included):
    their networks and batches are tiny, and on 2 cores shared with anything else, two OpenMP threads waiting on
    each other made a narrow network's step ~100x slower (0.9 s, not 9 ms). The slow tests (real data, timed) keep
    the machine's threads."""
    torch.set_num_threads(THREADS if item.get_closest_marker("slow") else 1)


@pytest.fixture(scope="session", autouse=True)
def _memoized_docstrings():
    """Every in-process `cifarlab` command parses the same class docstrings for its flags' help (~1 s a parser):
    parse each once a session, keyed by the object itself and jsonargparse's options (a private function: if it
    moves, the tests are only slower)."""
    try:
        from jsonargparse import _optionals
        original = _optionals.parse_docstring
    except (ImportError, AttributeError):
        yield
        return
    cache: dict = {}

    def parse_docstring(component, params=False, logger=None):
        options = _optionals.get_docstring_parse_options()
        try:
            key = (component, params, options["style"], options["attribute_docstrings"])
            hash(key)
        except TypeError:  # an unhashable component: parsed every time, as without the cache
            return original(component, params=params, logger=logger)
        if key not in cache:
            cache[key] = original(component, params=params, logger=logger)
        return cache[key]

    _optionals.parse_docstring = parse_docstring
    yield
    _optionals.parse_docstring = original


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A tiny trained run on a synthetic 3-class folder: ``(data_root, run_dir, best_ckpt)``."""
    from cifarlab.cli import main

    base = tmp_path_factory.mktemp("smoke")
    root = make_image_folder(base / "data")
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    main(["fit", "--config", str(config), "--data.root", str(root), "--run.dir", str(base / "runs"),
          "--trainer.max_epochs", "2"])
    run = base / "runs" / "smoke" / "version_0"
    best = next(p for p in (run / "checkpoints").glob("epoch*.ckpt"))
    return root, run, best
