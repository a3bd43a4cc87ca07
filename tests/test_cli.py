"""The command line: help for every command, and clear one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import run_kvswap


@pytest.mark.parametrize(
    "argv, flags",
    [
        ([], ["model", "generate", "--version"]),
        (["model"], ["prepare", "list"]),
        (["model", "prepare"], ["--gguf", "--models-dir", "--name", "--no-check-answer", "--force"]),
        (["generate"], ["--engine", "--model", "--prompt-file", "--question", "--max-new-tokens",
                        "--document-tokens", "--dtype", "--check", "--json"]),
    ],
    ids=["top", "model", "prepare", "generate"],
)
def test_help_describes_flags(argv: list[str], flags: list[str]) -> None:
    res = run_kvswap(*argv, "--help")
    assert res.returncode == 0
    for flag in flags:
        assert flag in res.stdout


def _error(res) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    return res.stderr


def test_generate_without_prepared_model(tmp_path: Path) -> None:
    assert "not prepared yet" in _error(run_kvswap("generate", "--models-dir", str(tmp_path)))


def test_generate_unknown_engine() -> None:
    assert "invalid choice" in _error(run_kvswap("generate", "--engine", "nope"))


def test_generate_bad_prompt_file(tmp_path: Path, default_model: Path) -> None:
    assert "cannot read --prompt-file" in _error(
        run_kvswap("generate", "--model", str(default_model), "--prompt-file", str(tmp_path / "nope.txt")))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    assert "not UTF-8" in _error(
        run_kvswap("generate", "--model", str(default_model), "--prompt-file", str(tmp_path / "bin.txt")))


def test_generate_prompt_too_long(default_model: Path) -> None:
    err = _error(run_kvswap("generate", "--model", str(default_model), "--document-tokens", "9000"))
    assert "exceeds --max-model-len 8192" in err


def test_generate_bad_number() -> None:
    assert "must be >= 1" in _error(run_kvswap("generate", "--max-new-tokens", "0"))


@pytest.mark.parametrize("device, needle", [("meta", "unsupported device 'meta'"), ("tpu", "unknown device 'tpu'")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU is available")]))
def test_generate_bad_device(device: str, needle: str, default_model: Path) -> None:
    assert needle in _error(run_kvswap("generate", "--model", str(default_model), "--device", device))
