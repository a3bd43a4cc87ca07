"""KVSwap inside vLLM against the HF reference runtime at the same settings.

    python -m benchmarks.vllm_quality --out results/vllm_quality.json [--context 7000] [--cases 10]

Both runtimes keep the KV in the disk tier and decode with the same predictor, M, G, tails and
layer-ahead prediction; M defaults to 1/8 of the context (the hot tier holds 1/8 of a prompt's
KV). Measured:
- passkey: `--cases` built-in documents of ~context tokens (pass key at spread depths), greedy
  answers from a vLLM engine (all prompts in one batch) and from the HF disk runtime
  (kvswap_vllm.runtime.hf_disk), correct = the key is in the answer; plus how many answers are
  token for token the same;
- teacher forcing: `--context` tokens of natural text (Python stdlib docstrings), then
  `--positions` tokens fed one by one whatever each runtime predicts. vLLM forces them with a
  logits processor and returns its raw top-1 through logprobs; agreement = the two runtimes'
  top-1 match; each runtime's perplexity over the forced tokens, and top-1 agreement of each
  with dense HF attention, are reported beside it.
The vLLM side runs in a fresh process (spawned engine, enforce_eager so the layer-ahead hooks
run); the HF side in this one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from benchmarks import write_json
from kvswap_vllm.demo_document import build_document, entries_for_tokens
from kvswap_vllm.generation import chat_prompt_ids
from kvswap_vllm.models.prepare import default_model_path

ANSWER_TOKENS = 16


def log(msg: str) -> None:
    print(f"vllm_quality: {msg}", file=sys.stderr, flush=True)


class ForcedTokens(LogitsProcessor):
    """Teacher forcing in vLLM: a request whose SamplingParams.extra_args hold `forced_tokens`
    emits exactly those tokens in order; its raw logits (and so its own top-1) still come back
    in the logprobs, which vLLM computes before logits processors run."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        # Batch row -> (tokens to force, the request's running output token list).
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, _, output in batch_update.added:
            forced = (params.extra_args or {}).get("forced_tokens") if params is not None else None
            if forced:
                self.rows[i] = (list(forced), output)
            else:
                self.rows.pop(i, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for i, (forced, output) in self.rows.items():
            if len(output) < len(forced):
                token = forced[len(output)]
                logits[i].fill_(float("-inf"))
                logits[i, token] = 0.0
        return logits


def _engine_options(spec: dict) -> dict:
    return {"kv_connector": "kvswap", "kv_role": "kv_both",
            "kv_connector_extra_config": {"kv_dir": spec["kv_dir"], "predictor": spec["predictor"],
                                          "budget_tokens": spec["budget_tokens"], "group_size": spec["group_size"]}}


def _vllm_child(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["pool_gib"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype="float32", max_model_len=spec["max_model_len"], enforce_eager=True,
              seed=0, kv_transfer_config=_engine_options(spec), logits_processors=[ForcedTokens],
              max_num_seqs=len(spec["prompts"]) + 1)
    forced = spec["forced"]
    params = [SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS) for _ in spec["prompts"]]
    params.append(SamplingParams(temperature=0.0, max_tokens=len(forced), ignore_eos=True, logprobs=1,
                                 extra_args={"forced_tokens": forced}))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in [*spec["prompts"], spec["context"]]]
    outs = llm.generate(prompts, params)
    answers = [list(o.outputs[0].token_ids) for o in outs[:-1]]
    tf = outs[-1].outputs[0]
    if list(tf.token_ids) != forced:
        raise RuntimeError("vLLM did not emit the forced tokens: teacher forcing is broken")
    # Each position's dict holds the emitted (forced) token and the raw top-1 (rank 1).
    top1 = [next(t for t, lp in pos.items() if lp.rank == 1) for pos in tf.logprobs]
    nll = [-pos[t].logprob for pos, t in zip(tf.logprobs, forced)]
    out_path.write_text(json.dumps({"answers": answers, "top1": top1, "nll": nll}))
    llm.llm_engine.engine_core.shutdown()


@torch.inference_mode()
def _hf_forced(forward, context: list[int], forced: list[int], chunk: int) -> tuple[list[int], list[float]]:
    """Top-1 and NLL at each forced position; `forward(ids)` runs the model with its cache."""
    ids = torch.tensor([context])
    for start in range(0, ids.shape[1], chunk):
        logits = forward(ids[:, start:start + chunk])
    top1, nll = [], []
    for t in forced:
        lp = torch.log_softmax(logits.float(), -1)
        top1.append(int(lp.argmax()))
        nll.append(-float(lp[t]))
        logits = forward(torch.tensor([[t]]))
    return top1, nll


def _hf_dense(model_dir: Path, spec: dict) -> tuple[list[int], list[float]]:
    """Teacher forcing with dense attention, the KV in HF's own in-memory cache."""
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache = DynamicCache()

    def forward(ids):
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]

    return _hf_forced(forward, spec["context"], spec["forced"], 1024)


def _hf_side(model_dir: Path, spec: dict, kv_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from kvswap_vllm.models.fingerprint import model_fingerprint
    from kvswap_vllm.predict.adapter import adapter_for
    from kvswap_vllm.predict.base import SelectionConfig
    from kvswap_vllm.runtime.hf_disk import DiskRuntimeConfig, KVSwapDisk, generate
    from kvswap_vllm.runtime.hf_kvswap import model_shape
    from kvswap_vllm.store import DiskStore, StoreConfig

    t0 = time.perf_counter()
    dense_top1, dense_nll = _hf_dense(model_dir, spec)
    log(f"HF dense teacher forcing: {time.perf_counter() - t0:.0f} s")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = model_shape(model.config)
    fp = model_fingerprint(model_dir)
    store = DiskStore(StoreConfig(root=kv_dir, model_fingerprint=fp, num_layers=shape.num_layers,
                                  num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                                  group_size=spec["group_size"], dtype="float32", tenant="hf-reference"))
    config = DiskRuntimeConfig(SelectionConfig(spec["budget_tokens"], spec["group_size"]), spec["predictor"])
    runtime = KVSwapDisk(model, store, config, adapter_for(spec["predictor"], fp, shape.head_dim))
    answers = []
    eos = {model.config.eos_token_id} if isinstance(model.config.eos_token_id, int) else set(model.config.eos_token_id)
    for i, prompt in enumerate(spec["prompts"]):
        tokens, _ = generate(model, runtime, prompt, ANSWER_TOKENS, eos)
        answers.append(tokens)
        log(f"HF kvswap passkey case {i + 1}/{len(spec['prompts'])}")
    seq = runtime.new_sequence()

    def sparse_forward(ids):
        return model(input_ids=ids, past_key_values=seq, use_cache=True).logits[0, -1]

    top1, nll = _hf_forced(sparse_forward, spec["context"], spec["forced"], config.prefill_chunk)
    runtime.current.close()
    store.close()
    return {"answers": answers, "top1": top1, "nll": nll, "dense_top1": dense_top1, "dense_nll": dense_nll}


def _natural_text(model: Path, tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    from kvswap_vllm.predict.calibration_text import stdlib_docstrings

    text = stdlib_docstrings(max_chars=1_200_000)[600_000:]  # away from the calibration text
    ids = AutoTokenizer.from_pretrained(model)(text).input_ids[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"evaluation text too short: {len(ids)} tokens")
    return ids


def _agreement(a: list[int], b: list[int]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--context", type=int, default=7000, help="prompt tokens (default 7000)")
    p.add_argument("--cases", type=int, default=10, help="passkey prompts (default 10)")
    p.add_argument("--positions", type=int, default=256, help="teacher-forced tokens (default 256)")
    p.add_argument("--hot-fraction", type=float, default=1 / 8, help="M as a share of the context (default 1/8)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--predictor", default="kvswap")
    p.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _vllm_child(*args.child)
        return 0
    model = args.model or default_model_path()
    g = args.group_size
    budget = int(args.context * args.hot_fraction) // g * g
    docs = [build_document(num_entries=entries_for_tokens(args.context), depth=(i + 0.5) / args.cases, seed=100 + i)
            for i in range(args.cases)]
    text = _natural_text(model, args.context + args.positions)
    spec = {"model": str(model), "prompts": [chat_prompt_ids(model, d.prompt()) for d in docs],
            "context": text[:args.context], "forced": text[args.context:], "predictor": args.predictor,
            "budget_tokens": budget, "group_size": g}
    longest = max(len(x) for x in [*spec["prompts"], spec["context"]])
    spec["max_model_len"] = longest + max(args.positions, ANSWER_TOKENS) + 64
    spec["pool_gib"] = 1 + (args.cases + 1) * spec["max_model_len"] * 100_000 // 2**30  # logical: mapped lazily
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvswap-vllm-quality-") as tmp:
        spec["kv_dir"] = str(Path(tmp) / "vllm")
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        log(f"vLLM engine: {args.cases} passkey prompts + teacher forcing, M={budget}, G={g}")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.vllm_quality", "--child", str(spec_path),
                               str(out_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"the vLLM run failed:\n{proc.stderr[-4000:]}")
        vllm_out = json.loads(out_path.read_text())
        log(f"vLLM done after {time.perf_counter() - t0:.0f} s; HF reference runtime next")
        hf = _hf_side(model, spec, Path(tmp) / "hf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    vllm_ok = [d.is_correct(tok.decode(a)) for d, a in zip(docs, vllm_out["answers"])]
    hf_ok = [d.is_correct(tok.decode(a)) for d, a in zip(docs, hf["answers"])]
    result = {
        "benchmark": "vllm_quality", "model": str(model), "predictor": args.predictor,
        "context_tokens": [len(x) for x in spec["prompts"]], "budget_tokens": budget, "group_size": g,
        "hot_fraction": args.hot_fraction,
        "passkey": {"vllm_acc": sum(vllm_ok) / len(docs), "hf_acc": sum(hf_ok) / len(docs),
                    "vllm_hits": vllm_ok, "hf_hits": hf_ok,
                    "answers_identical": sum(a == b for a, b in zip(vllm_out["answers"], hf["answers"]))},
        "teacher_forced": {
            "positions": args.positions, "context": args.context,
            "top1_agreement_vllm_vs_hf": _agreement(vllm_out["top1"], hf["top1"]),
            "top1_agreement_vllm_vs_dense": _agreement(vllm_out["top1"], hf["dense_top1"]),
            "top1_agreement_hf_vs_dense": _agreement(hf["top1"], hf["dense_top1"]),
            "ppl_vllm": round(math.exp(sum(vllm_out["nll"]) / args.positions), 4),
            "ppl_hf": round(math.exp(sum(hf["nll"]) / args.positions), 4),
            "ppl_dense": round(math.exp(sum(hf["dense_nll"]) / args.positions), 4)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(write_json(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
