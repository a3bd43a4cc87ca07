"""Generation on the real default model: a real vLLM engine (one per module) and HF transformers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import pytest

from kvswap_vllm.demo_document import build_document, entries_for_tokens
from kvswap_vllm.generation import GenerationConfig, Generator, KVSwapOptions, chat_prompt_ids, create_generator
from tests.helpers import run_kvswap

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_gen(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generator]:
    # With the kvswap connector (the default): outputs must not change.
    options = KVSwapOptions(predictor=None, kv_dir=tmp_path_factory.mktemp("kv"))
    with create_generator("vllm", GenerationConfig(model=default_model, max_new_tokens=20, kvswap=options)) as gen:
        yield gen


@pytest.fixture(scope="module")
def hf_gen(default_model: Path) -> Iterator[Generator]:
    with create_generator("hf", GenerationConfig(model=default_model, max_new_tokens=20)) as gen:
        yield gen


def test_vllm_batch_of_different_lengths_in_order(vllm_gen: Generator, default_model: Path) -> None:
    docs = [build_document(entries_for_tokens(n), depth=d, seed=s)
            for n, d, s in [(1000, 0.2, 1), (3500, 0.5, 2), (2000, 0.9, 3)]]
    prompts = [chat_prompt_ids(default_model, d.prompt()) for d in docs]
    results = vllm_gen.generate(prompts)
    assert [r.prompt_tokens for r in results] == [len(p) for p in prompts]
    assert vllm_gen.kv_path.startswith("vllm + kvswap connector")
    again = vllm_gen.generate(prompts[1:2])[0]  # vLLM's own prefix cache or the disk tier serves it
    assert again.text == results[1].text and again.extra["cached_prompt_tokens"] >= len(prompts[1]) - 128
    for doc, res in zip(docs, results):
        assert doc.is_correct(res.text), (doc.answer, res.text)
        assert res.new_tokens >= 1 and res.ttft_s > 0


def test_vllm_greedy_equals_hf(vllm_gen: Generator, hf_gen: Generator, default_model: Path) -> None:
    prompts = [chat_prompt_ids(default_model, q) for q in
               ["What is the capital of France?", build_document(entries_for_tokens(2000)).prompt()]]
    v, h = vllm_gen.generate(prompts), hf_gen.generate(prompts)
    assert [r.text for r in v] == [r.text for r in h]
    assert "Paris" in v[0].text


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_ignore_eos_generates_exactly_max_new_tokens(engine: str, request: pytest.FixtureRequest,
                                                     default_model: Path) -> None:
    gen: Generator = request.getfixturevalue(f"{engine}_gen")
    prompt = chat_prompt_ids(default_model, "What is the capital of France?")
    stopped = gen.generate([prompt])[0]
    assert stopped.new_tokens < gen.config.max_new_tokens  # it ends its answer
    config = gen.config
    gen.config = dataclasses.replace(config, ignore_eos=True)
    try:
        full = gen.generate([prompt])[0]
    finally:
        gen.config = config
    assert full.new_tokens == config.max_new_tokens
    assert full.text.startswith(stopped.text.strip())


def test_hf_store_reads_with_the_decode_policy_threads(default_model: Path, tmp_path: Path) -> None:
    from kvswap_vllm.prefetch.policy import decode_io_threads
    from kvswap_vllm.store import StoreConfig

    options = KVSwapOptions(predictor="kvswap", kv_dir=tmp_path)
    with create_generator("hf", GenerationConfig(model=default_model, max_new_tokens=2, kvswap=options)) as gen:
        assert gen._store.config.io_threads == decode_io_threads(StoreConfig.io_threads)
        assert gen.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]])[0].new_tokens == 2


def test_hf_rejects_too_long_prompt(hf_gen: Generator) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        hf_gen.generate([[1] * 8190])


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_cli_generate_builtin_document(engine: str, default_model: Path) -> None:
    # hf runs KVSwap with the KV cache on disk (the default adapter comes from `make adapter`).
    res = run_kvswap("generate", "--engine", engine, "--model", str(default_model), "--check", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["correct"] is True and report["engine"] == engine
    assert report["kv_path"].startswith(engine)
    assert 3000 < report["prompt_tokens"] < 4200
    assert report["decode_tokens_per_s"] > 0 and report["peak_rss_mb"] > 500
    assert report["processes"] >= (3 if engine == "vllm" else 1)
    if engine == "hf":
        assert "KVSwap, KV cache on disk" in report["kv_path"]
        row = report["prompts"][0]
        # On the CPU the default runs no prefetch: every layer selects from its own query.
        assert "prefetch off" in report["kv_path"]
        assert row["bytes_read"] > 0 and row["prefetched_loads"] == 0 and 0 < row["reuse_rate"] < 1
        # The hot tier holds M/G = 100 groups per layer: far less than the 3.5k-token context.
        assert row["hot_tier_bytes"] < 0.25 * report["prompt_tokens"] * 30 * 3 * 64 * 2 * 4


def test_cli_hf_batch_and_dense_cache(default_model: Path, tmp_path: Path) -> None:
    res = run_kvswap("generate", "--engine", "hf", "--model", str(default_model), "--predictor", "none",
                     "--batch-size", "2", "--document-tokens", "1200", "--check", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert len(report["prompts"]) == 2 and report["kv_path"].startswith("hf: HF transformers, dense")
    lengths = [p["prompt_tokens"] for p in report["prompts"]]
    assert lengths[0] != lengths[1]


def test_cli_missing_adapter_is_a_clear_error(default_model: Path, tmp_path: Path) -> None:
    res = run_kvswap("generate", "--engine", "hf", "--model", str(default_model),
                     "--adapter", str(tmp_path / "nope"), "--document-tokens", "300")
    assert res.returncode == 2 and "no low-rank adapter" in res.stderr and "kvswap calibrate" in res.stderr


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_cli_kvswap_decoding_with_a_hot_tier_budget_in_mib(engine: str, default_model: Path, tmp_path: Path) -> None:
    """--budget-mb sizes one sequence's hot tier (all layers + a staging layer) and so decides M:
    20 MiB / (30 + 1 layers x 1,536 bytes per token) = 440 tokens, on both engines (on vLLM through
    the connector's KVSwap decoding)."""
    res = run_kvswap("generate", "--engine", engine, "--model", str(default_model), "--predictor", "kvswap",
                     "--budget-mb", "20", "--document-tokens", "1500", "--kv-dir", str(tmp_path / "kv"),
                     "--prefetch", "on", "--check", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["correct"] is True
    if engine == "hf":
        assert "M=440 tokens" in report["kv_path"] and "prefetch on" in report["kv_path"]
        assert report["prompts"][0]["hot_tier_bytes"] <= 20 << 20
        assert report["prompts"][0]["prefetched_loads"] > 0  # --prefetch on: layer-ahead loads
    else:
        assert "KVSwap decoding" in report["kv_path"] and "M=440 tokens" in res.stderr
