"""An OpenAI-compatible vLLM server for the length of a `with` block (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message ends with its log."""


@contextlib.contextmanager
def running_server(argv: list[str], env: dict[str, str], log_path: Path,
                   timeout_s: float = 600) -> Iterator[tuple[str, int]]:
    """Start the server (its own process group), wait for /health, yield its base URL and pid;
    stop it (SIGINT, then SIGKILL) on exit. `argv` must include --port."""
    port = argv[argv.index("--port") + 1]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if server.poll() is not None:
                    raise ServerFailed(f"server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise ServerFailed(f"server did not become healthy in {timeout_s:.0f} s:\n"
                                           f"{log_path.read_text()[-4000:]}") from None
                    time.sleep(2)
            yield base, server.pid
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def chat(base: str, model: str, content: str, max_tokens: int, timeout_s: float = 900) -> str:
    """One greedy chat completion; the answer's text."""
    body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
