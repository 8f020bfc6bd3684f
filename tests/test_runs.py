"""The run folder layout: where runs go, `--ckpt_path last`, and the version each process logs into."""

from __future__ import annotations

import os

import pytest

from cifarlab.errors import CifarlabError
from cifarlab.runs import VERSION_ENV, claim_version, resolve_last, run_root


def test_default_root_dir_is_the_run_dir_unless_both_disagree():
    assert run_root("runs", None) == "runs"
    assert run_root("runs", "/tmp/x") == "/tmp/x"  # where Lightning users put runs
    with pytest.raises(CifarlabError, match="pass one of them"):
        run_root("elsewhere", "/tmp/x")


def test_ckpt_path_last_is_the_newest_last_ckpt_or_a_clear_error(tmp_path):
    with pytest.raises(CifarlabError, match="no checkpoint under"):
        resolve_last(tmp_path)
    for version in (0, 1):
        folder = tmp_path / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
    (tmp_path / "version_x" / "checkpoints").mkdir(parents=True)
    (tmp_path / "version_x" / "checkpoints" / "last.ckpt").write_bytes(b"not a run")
    os.utime(tmp_path / "version_0" / "checkpoints" / "last.ckpt", ns=(2 * 10**18, 2 * 10**18))  # the newest
    assert resolve_last(tmp_path) == tmp_path / "version_0" / "checkpoints" / "last.ckpt"


def test_each_process_claims_its_version(tmp_path, monkeypatch):
    monkeypatch.delenv(VERSION_ENV, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_4").mkdir()
    assert claim_version(tmp_path) == 5  # after the highest used
    assert claim_version(tmp_path, resume=4) == 4  # a resumed run logs into its own folder
    monkeypatch.setenv(VERSION_ENV, "7")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert claim_version(tmp_path) == 7  # a DDP worker: rank 0's folder, not the next free one
    with pytest.raises(CifarlabError, match="cannot write the run directory"):
        (tmp_path / "file").write_text("")
        claim_version(tmp_path / "file" / "sub")
