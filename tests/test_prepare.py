"""`kvswap model prepare`: real conversion, idempotence, and every bad input leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvswap_vllm.errors import ModelPrepareError
from kvswap_vllm.models import prepare
from kvswap_vllm.models.prepare import (
    DEFAULT_MODEL_NAME, MARKER_FILE, PrepareOptions, default_gguf_path, prepare_model, resolve_model,
)
from tests.helpers import REPO, run_kvswap, tmpfs, write_tiny_gguf


def _assert_one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("kvswap: error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "nope.gguf", "GGUF file not found"),
        (lambda d: (d / "x.gguf").write_text("hello") and d / "x.gguf", "not a GGUF file"),
        (lambda d: write_tiny_gguf(d / "g.gguf", "gemma3"), "unsupported architecture"),
    ],
    ids=["missing", "not-gguf", "unsupported-arch"],
)
def test_cli_bad_gguf_exit_2_nothing_written(tmp_path: Path, make, needle: str) -> None:
    models = tmp_path / "models"
    res = run_kvswap("model", "prepare", "--gguf", str(make(tmp_path)), "--models-dir", str(models))
    _assert_one_line_error(res, needle)
    assert _visible(models) == []


def test_cli_unwritable_models_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    res = run_kvswap("model", "prepare", "--models-dir", str(tmp_path / "afile" / "models"))
    _assert_one_line_error(res, "cannot write to model folder")


def test_cli_read_only_models_dir(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "4m", readonly=True) as ro:
        res = run_kvswap("model", "prepare", "--models-dir", str(ro))
    _assert_one_line_error(res, "Read-only file system")


def test_cli_not_enough_space_refused_up_front(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "64m") as small:
        res = run_kvswap("model", "prepare", "--models-dir", str(small))
        _assert_one_line_error(res, "not enough free space")
        assert _visible(small) == []


@pytest.mark.slow
def test_disk_full_during_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Skip the up-front check so the real ENOSPC happens while the weights are written.
    monkeypatch.setattr(prepare, "_ensure_free_space", lambda folder, need: None)
    with tmpfs(tmp_path / "full", "100m") as full:
        with pytest.raises(ModelPrepareError, match="disk full"):
            prepare_model(PrepareOptions(models_dir=full))
        assert _visible(full) == []


@pytest.mark.slow
def test_real_conversion_verified_and_idempotent(tmp_path: Path) -> None:
    res = run_kvswap("model", "prepare", "--models-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    target = tmp_path / DEFAULT_MODEL_NAME
    assert res.stdout.strip() == str(target)
    assert _visible(tmp_path) == [DEFAULT_MODEL_NAME]  # no temp folders left
    marker = json.loads((target / MARKER_FILE).read_text())
    assert "paris" in marker["verified_answer"].lower() and marker["dtype"] == "float32"
    assert "[1/3]" in res.stderr and "[3/3]" in res.stderr  # progress was shown
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    again = prepare_model(PrepareOptions(models_dir=tmp_path))
    assert not again.converted and (target / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_killed_conversion_is_invisible_and_cleaned_up(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kvswap_vllm.cli", "model", "prepare", "--models-dir", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any((tmp_path).glob(".tmp-*/model.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / DEFAULT_MODEL_NAME).exists()
    with pytest.raises(ModelPrepareError, match="not prepared"):
        resolve_model(None, tmp_path)
    prepare._remove_stale_temps(tmp_path, DEFAULT_MODEL_NAME)
    assert _visible(tmp_path) == []


def test_up_to_date_needs_matching_source(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MARKER_FILE).write_text(json.dumps({"source_sha256": "abc", "converter_version": prepare.CONVERTER_VERSION}))
    assert prepare._is_up_to_date(tmp_path, "abc")
    assert not prepare._is_up_to_date(tmp_path, "def")
    (tmp_path / MARKER_FILE).write_text("{not json")
    assert not prepare._is_up_to_date(tmp_path, "abc")


def test_install_swaps_atomically(tmp_path: Path) -> None:
    old, new = tmp_path / "m", tmp_path / ".tmp-m-1"
    old.mkdir(); (old / "w").write_text("old")
    new.mkdir(); (new / "w").write_text("new")
    prepare._install(new, old)
    assert (old / "w").read_text() == "new" and _visible(tmp_path) == ["m"]


def test_resolve_model(tmp_path: Path, default_model: Path) -> None:
    assert resolve_model(str(default_model)) == default_model
    assert resolve_model(None, default_model.parent) == default_model
    assert resolve_model(DEFAULT_MODEL_NAME, default_model.parent) == default_model
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPrepareError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelPrepareError, match="not found"):
        resolve_model("no-such-model", tmp_path)


def test_default_gguf_ships_with_package() -> None:
    assert default_gguf_path().stat().st_size > 90e6
