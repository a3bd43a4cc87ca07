from __future__ import annotations

from pathlib import Path

import pytest

from kvswap_vllm.errors import ModelPrepareError
from kvswap_vllm.models.gguf_file import inspect_gguf
from kvswap_vllm.models.prepare import default_gguf_path
from tests.helpers import write_tiny_gguf


def test_real_default_gguf_is_llama() -> None:
    info = inspect_gguf(default_gguf_path())
    assert info.architecture == "llama"
    assert info.num_tensors == 272
    assert 100e6 < info.num_params < 200e6  # SmolLM2-135M


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_supported_architectures(tmp_path: Path, arch: str) -> None:
    info = inspect_gguf(write_tiny_gguf(tmp_path / "m.gguf", arch))
    assert info.architecture == arch and info.name == "tiny-test-model" and info.num_params == 32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.gguf", "GGUF file not found"),
        (lambda p: p, "not a file"),
        (lambda p: (p / "x.gguf").write_bytes(b"PK\x03\x04 a zip file") and p / "x.gguf", "not a GGUF file"),
        (lambda p: write_tiny_gguf(p / "g.gguf", "gemma3"), "unsupported architecture 'gemma3'"),
    ],
    ids=["missing", "directory", "not-gguf", "unsupported-arch"],
)
def test_bad_inputs_name_the_problem(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ModelPrepareError, match=message):
        inspect_gguf(make(tmp_path))


def test_truncated_real_gguf_is_refused(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelPrepareError, match="corrupt or truncated"):
        inspect_gguf(cut)
