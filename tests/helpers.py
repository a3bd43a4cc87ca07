"""Helpers shared by tests: a tiny GGUF writer, the CLI runner, real tmpfs mounts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from benchmarks.server import free_port  # noqa: F401  (the tests take it from here)
from benchmarks.tiny_model import write_tiny_llama  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def with_value_bases(adapter, rank: int | None = None, seed: int = 1):
    """`adapter` with value bases of `rank` (default: its key rank) from random values."""
    import dataclasses

    import torch

    from kvswap_vllm.predict.adapter import joint_basis

    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(128, adapter.num_kv_heads, adapter.head_dim, generator=g) for _ in range(adapter.num_layers)]
    return dataclasses.replace(adapter, value=tuple(joint_basis(v, rank or adapter.rank)[0] for v in values))


def write_tiny_gguf(path: Path, arch: str = "llama") -> Path:
    """A valid GGUF with one small tensor and the given architecture (no real weights)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-model")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_kvswap(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `kvswap` entry point the way a user does."""
    return subprocess.run(
        [sys.executable, "-m", "kvswap_vllm.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO,
    )


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """Mount a real small tmpfs at `path` (root only); skip the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here ({res.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def running_server(argv: list[str], env: dict[str, str], log_path: Path,
                   timeout_s: float = 600) -> Iterator[tuple[str, int]]:
    """benchmarks.server.running_server, failing the test when the server does not come up."""
    from benchmarks.server import ServerFailed
    from benchmarks.server import running_server as run

    try:
        with run(argv, env, log_path, timeout_s) as server:
            yield server
    except ServerFailed as e:
        pytest.fail(str(e))

