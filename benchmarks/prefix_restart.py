"""Prefix reuse across an engine restart: the same long prompt, stock vLLM and vLLM with the
kvswap connector, each run in a fresh process.

    python -m benchmarks.prefix_restart --out results/prefix_restart.json [--prompt-tokens 3500]

Runs: `stock` (no connector), `cold` (connector, empty disk tier: computes and saves the
prompt), `warm` (a new engine on the same disk tier: loads the prefix), and with --corrupt a
fourth run after one byte of a stored block was flipped (the block must be recomputed, the
answer unchanged). Writes ttft_cold_s, ttft_warm_s, prefill_tokens_saved_ratio and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_json
from kvswap_vllm.demo_document import build_document, entries_for_tokens
from kvswap_vllm.generation import chat_prompt_ids
from kvswap_vllm.models.prepare import default_model_path

RECOVERED = "Recovered from KV load failure"


def run_engine(model: Path, prompt: list[int], max_new_tokens: int, kv_dir: Path | None,
               timeout_s: float = 900, engine_kwargs: dict | None = None, env: dict | None = None,
               connector_options: dict | None = None, prompts: list[list[int]] | None = None) -> dict:
    """One engine start + greedy requests, in a fresh process (a real restart). engine_kwargs
    go to vLLM's LLM (e.g. tensor_parallel_size); env to the process; connector_options to
    kv_connector_extra_config. `prompts` (a batch) replaces `prompt` when given."""
    spec = {"model": str(model), "prompts": prompts or [prompt], "max_new_tokens": max_new_tokens,
            "kv_dir": str(kv_dir) if kv_dir else None, "engine_kwargs": engine_kwargs or {},
            "connector_options": connector_options or {}}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.prefix_restart", "--child", str(spec_path),
                               str(out_path)], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = json.loads(out_path.read_text())
    out["process_s"] = round(time.perf_counter() - t0, 2)
    out["recovered_from_load_failure"] = RECOVERED in proc.stderr
    return out


def _child(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ktc = None
    if spec["kv_dir"]:
        ktc = {"kv_connector": "kvswap", "kv_role": "kv_both",
               "kv_connector_extra_config": {"kv_dir": spec["kv_dir"], **spec["connector_options"]}}
    longest = max(len(p) for p in spec["prompts"])
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=max(4096, longest + 256),
              enforce_eager=True, seed=0, disable_log_stats=False, kv_transfer_config=ktc,
              **spec["engine_kwargs"])
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"])
    t1 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    generate_s = time.perf_counter() - t1
    llm.llm_engine.engine_core.shutdown()
    out = outs[0]
    cached = int(out.num_cached_tokens or 0)
    out_path.write_text(json.dumps({
        "engine_start_s": round(start_s, 2),
        "generate_s": round(generate_s, 3),
        "ttft_s": round(float(out.metrics.first_token_latency), 4),
        "prompt_tokens": len(spec["prompts"][0]),
        "cached_tokens": cached,
        "prefill_tokens": len(spec["prompts"][0]) - cached,
        "token_ids": list(out.outputs[0].token_ids),
        "text": out.outputs[0].text,
        "batch": [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                   "decode_s": float(o.metrics.last_token_ts - o.metrics.first_token_ts)} for o in outs],
    }))


def corrupt_one_block(kv_dir: Path) -> Path:
    """Flip one byte in the middle of a stored block of a middle layer (a file that a prefix
    lookup finds: one with block hashes); returns the file."""
    from kvswap_vllm.store.format import open_segment

    infos = [info for info in map(lambda f: open_segment(f, None), sorted(kv_dir.rglob("*.arrow")))
             if info.block_hashes]
    if not infos:
        raise RuntimeError(f"no block files with stored prefixes under {kv_dir}")
    info = infos[len(infos) // 2]
    path = info.path
    offset = info.data_offset + info.row_bytes * (info.num_groups // 2) + info.row_bytes // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


def measure(model: Path, prompt_tokens: int, max_new_tokens: int, kv_dir: Path, corrupt: bool,
            connector_options: dict | None = None) -> dict:
    """Stock vLLM, then a cold and a warm run with the connector (its `connector_options`, e.g.
    KVSwap decoding), each a fresh engine process; optionally a run after damaging a block."""
    doc = build_document(num_entries=entries_for_tokens(prompt_tokens))
    prompt = chat_prompt_ids(model, doc.prompt())
    runs: dict[str, dict] = {}
    for name, tier in (("stock", None), ("cold", kv_dir), ("warm", kv_dir)):
        print(f"[prefix_restart] {name} run ({len(prompt)} prompt tokens)...", file=sys.stderr, flush=True)
        runs[name] = run_engine(model, prompt, max_new_tokens, tier, connector_options=connector_options)
    if corrupt:
        damaged = corrupt_one_block(kv_dir)
        print(f"[prefix_restart] flipped a byte in {damaged}; corrupt run...", file=sys.stderr, flush=True)
        runs["corrupt"] = run_engine(model, prompt, max_new_tokens, kv_dir, connector_options=connector_options)
    cold, warm = runs["cold"]["prefill_tokens"], runs["warm"]["prefill_tokens"]
    ids = {name: r.pop("token_ids") for name, r in runs.items()}
    return {
        "model": str(model),
        "prompt_tokens": len(prompt),
        "max_new_tokens": max_new_tokens,
        "ttft_stock_s": runs["stock"]["ttft_s"],
        "ttft_cold_s": runs["cold"]["ttft_s"],
        "ttft_warm_s": runs["warm"]["ttft_s"],
        "prefill_tokens_cold": cold,
        "prefill_tokens_warm": warm,
        "prefill_tokens_saved_ratio": round(1 - warm / cold, 4) if cold else 0.0,
        "connector_options": connector_options or {},
        "outputs_equal_stock": all(v == ids["stock"] for v in ids.values()),
        # With KVSwap decoding the outputs may differ from stock (sparse attention), never
        # between a cold run and the runs that reuse its files.
        "outputs_equal_cold": all(v == ids["cold"] for k, v in ids.items() if k != "stock"),
        "answer_correct": {k: doc.is_correct(r["text"]) for k, r in runs.items()},
        "disk_tier_bytes": sum(p.stat().st_size for p in kv_dir.rglob("*.arrow")),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON file to write")
    p.add_argument("--model", type=Path, default=None, help="default: the prepared default model")
    p.add_argument("--prompt-tokens", type=int, default=3500)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--kv-dir", type=Path, default=None, help="disk tier (default: a fresh temporary folder)")
    p.add_argument("--corrupt", action="store_true", help="also run once after corrupting a stored block")
    p.add_argument("--predictor", default=None, help="KVSwap decoding with this predictor (default: off)")
    p.add_argument("--budget-tokens", type=int, default=400, help="M with --predictor (default 400)")
    p.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    model = args.model or default_model_path()
    with tempfile.TemporaryDirectory(prefix="kvswap-prefix-") as tmp:
        options = {"predictor": args.predictor, "budget_tokens": args.budget_tokens} if args.predictor else None
        result = measure(model, args.prompt_tokens, args.max_new_tokens, args.kv_dir or Path(tmp), args.corrupt, options)
    print(write_json(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
