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

REPO = Path(__file__).resolve().parents[1]


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


def write_tiny_llama(path: Path, tokenizer_from: Path, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> Path:
    """A random-weight Llama small enough to start in seconds, with a real tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=32 * heads, intermediate_size=64 * heads,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, path)
    return path


@contextlib.contextmanager
def running_server(argv: list[str], env: dict[str, str], log_path: Path,
                   timeout_s: float = 600) -> Iterator[tuple[str, int]]:
    """Start an OpenAI-compatible server (its own process group), wait for /health, yield its
    base URL and pid; stop it (SIGINT, then SIGKILL) on exit. `argv` must include --port."""
    import signal
    import time
    import urllib.request

    port = argv[argv.index("--port") + 1]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if server.poll() is not None:
                    pytest.fail(f"server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"server did not become healthy in {timeout_s:.0f} s"
                    time.sleep(2)
            yield base, server.pid
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
