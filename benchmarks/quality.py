"""Quality of every predictor at the same budget, against dense attention, on the real model.

    python -m benchmarks.quality --out results/quality.json      # also writes results/quality.png

Runs in the HF reference runtime (kvswap_vllm.runtime.hf_kvswap): prefill dense, then decode
steps attend to the selected groups + the tail (the newest decoded tokens, up to
`--flush-groups` x G - 1 of them, as the disk runtimes keep them in memory until a whole
batch of groups goes to disk; the prompt's groups are all selectable). `--select exact` (default, as the disk runtimes
do): each layer selects from its own query, the layer-ahead prediction only prefetches (its hit
rate is reported as `ahead_hit`); `--select ahead`: layers >= 2 attend to the groups their
layer-ahead prediction chose, as in the paper. Each prompt
is prefilled once and the cache copied for every method, so all methods see the same prefix.
- passkey: the built-in station log at several lengths and depths; the last 16 prompt tokens
  and the answer are decoded sparsely; correct = the key appears in the answer.
- top-1 agreement and perplexity: teacher-forced next-token prediction over `--positions`
  positions of long natural text (Python stdlib docstrings, away from the calibration text),
  after a dense prefill of `--context` tokens; agreement = argmax equals dense's argmax.
- recall: share of the true attention mass inside the selection, per layer, over those steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from kvswap_vllm.demo_document import build_document, entries_for_tokens
from kvswap_vllm.predict.base import PREDICTORS, SelectionConfig
from kvswap_vllm.runtime.hf_kvswap import KVSwapReference

TEACHER_FORCED_QUESTION_TOKENS = 16


def log(msg: str) -> None:
    print(f"quality: {msg}", file=sys.stderr, flush=True)


def load(model_dir: Path, adapter_path: Path | None, calib_tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvswap_vllm.models.fingerprint import model_fingerprint
    from kvswap_vllm.predict.adapter import LowRankAdapter, calibrate, default_adapter_path, has_value_bases
    from kvswap_vllm.predict.calibration_text import SOURCE, stdlib_docstrings

    fp = model_fingerprint(model_dir)
    path = adapter_path or default_adapter_path(fp, rank=_head_dim(model_dir))
    if adapter_path is None and not has_value_bases(path):
        log(f"no adapter with value bases at {path}; calibrating ({calib_tokens} tokens)")
        calibrate(model_dir, [stdlib_docstrings()], max_tokens=calib_tokens, text_source=SOURCE).save(path)
    adapter = LowRankAdapter.load(path, fp)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model, adapter


def _head_dim(model_dir: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _step(model, token: torch.Tensor, past):
    out = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
    return out.logits[0, -1], out.past_key_values


@torch.inference_mode()
def passkey(model, tok, ref: KVSwapReference, methods: list[str], cases: list[tuple[int, float, int]],
            answer_tokens: int) -> dict[str, list[bool]]:
    results: dict[str, list[bool]] = {m: [] for m in methods}
    for i, (tokens, depth, seed) in enumerate(cases):
        doc = build_document(entries_for_tokens(tokens), depth=depth, seed=seed)
        text = tok.apply_chat_template([{"role": "user", "content": doc.prompt()}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        head, tail = ids[:, :-TEACHER_FORCED_QUESTION_TOKENS], ids[0, -TEACHER_FORCED_QUESTION_TOKENS:]
        ref.sparse = False
        prefix = model(input_ids=head, use_cache=True).past_key_values
        ref.sparse = True
        for m in methods:
            ref.predictor_name = m
            ref.start_sequence()
            past = copy.deepcopy(prefix)
            for t in tail:
                logits, past = _step(model, t, past)
            out = []
            for _ in range(answer_tokens):
                nxt = logits.argmax()
                out.append(int(nxt))
                if int(nxt) == tok.eos_token_id:
                    break
                logits, past = _step(model, nxt, past)
            ok = doc.is_correct(tok.decode(out))
            results[m].append(ok)
        log(f"passkey case {i + 1}/{len(cases)} ({ids.shape[1]} tokens, depth {depth}): "
            + " ".join(f"{m}={'ok' if results[m][-1] else 'MISS'}" for m in methods))
    return results


@torch.inference_mode()
def teacher_forced(model, tok, ref: KVSwapReference, methods: list[str], context: int, positions: int) -> dict:
    from kvswap_vllm.predict.calibration_text import stdlib_docstrings

    text = stdlib_docstrings(max_chars=1_200_000)[600_000:]  # away from the calibration text
    ids = tok(text, return_tensors="pt").input_ids[:, : context + positions + 1]
    if ids.shape[1] < context + positions + 1:
        raise SystemExit(f"evaluation text too short: {ids.shape[1]} tokens")
    ref.sparse = False
    prefix = model(input_ids=ids[:, :context], use_cache=True).past_key_values
    ref.sparse = True
    targets = ids[0, context + 1: context + positions + 1]
    out: dict[str, dict] = {}
    argmax: dict[str, torch.Tensor] = {}
    for m in methods:
        ref.predictor_name = m
        ref.measure_recall = True
        ref.start_sequence()
        past = copy.deepcopy(prefix)
        nll, picks = 0.0, []
        t0 = time.perf_counter()
        for j in range(positions):
            logits, past = _step(model, ids[0, context + j], past)
            nll += float(torch.nn.functional.cross_entropy(logits.view(1, -1), targets[j].view(1)))
            picks.append(int(logits.argmax()))
        argmax[m] = torch.tensor(picks)
        recall = ref.stats.recall()
        steps = max(1, ref.stats.steps - 1)
        out[m] = {"ppl": math.exp(nll / positions), "recall_per_layer": [round(r, 4) for r in recall],
                  "recall": round(sum(recall[2:]) / len(recall[2:]), 4),
                  "reuse": round(sum(ref.stats.reuse_sum[2:]) / (len(recall[2:]) * steps), 4),
                  "ahead_hit": None if ref.stats.ahead_hit() is None else round(ref.stats.ahead_hit(), 4),
                  "metadata_bytes_per_token_per_layer": round(
                      ref.predictor.metadata_bytes() / ((context + positions) * ref.shape.num_layers), 1),
                  "decode_s_per_step": round((time.perf_counter() - t0) / positions, 3)}
        ref.measure_recall = False
        log(f"teacher-forced {m}: ppl {out[m]['ppl']:.3f}, recall(L>=2) {out[m]['recall']}")
    dense = argmax.get("dense")
    for m in methods:
        out[m]["top1_agreement"] = round(float((argmax[m] == dense).float().mean()), 4) if dense is not None else None
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, title in zip(axes, ("passkey_acc", "top1_agreement", "recall"),
                              ("passkey accuracy", "top-1 agreement with dense", "attention recall (layers >= 2)")):
        ax.bar(methods, [result["methods"][m][key] or 0 for m in methods], color="tab:blue")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"SmolLM2-135M, M={result['budget']['budget_tokens']} tokens, G={result['budget']['group_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from kvswap_vllm.models.prepare import resolve_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", type=Path, default=None, help="adapter path without suffix (default: calibrate)")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--methods", default=",".join(PREDICTORS))
    p.add_argument("--budget", type=int, default=400, help="M, tokens per layer (default: 400)")
    p.add_argument("--group-size", type=int, default=4, help="G (default: 4)")
    p.add_argument("--lengths", default="1000,3000,7000", help="passkey prompt lengths in tokens")
    p.add_argument("--cases-per-length", type=int, default=10, help="depths per length (default: 10)")
    p.add_argument("--answer-tokens", type=int, default=14)
    p.add_argument("--context", type=int, default=6500, help="dense prefix before teacher forcing")
    p.add_argument("--positions", type=int, default=512, help="teacher-forced positions (default: 512)")
    p.add_argument("--flush-groups", type=int, default=16,
                   help="decoded tokens stay in the always-attended tail until it holds this many groups, "
                        "as in the disk runtimes (default: 16); 1 = the paper's tail of < G tokens")
    p.add_argument("--hysteresis", type=float, default=SelectionConfig.hysteresis,
                   help="groups attended at the previous step rank this share of M/G places higher "
                        f"(default: {SelectionConfig.hysteresis}; 0 = plain top-k)")
    p.add_argument("--residual-rank", type=int, default=SelectionConfig.residual_rank,
                   help="rank of the low-rank values kvswap estimates the unselected groups' attention with "
                        f"(default: {SelectionConfig.residual_rank}; 0 = none)")
    p.add_argument("--key-rank", type=int, default=SelectionConfig.key_rank,
                   help="numbers per token per layer of the low-rank keys: the adapter's leading basis columns "
                        f"(default: {SelectionConfig.key_rank or 'the adapter rank'}; 0 = the adapter's rank)")
    p.add_argument("--key-bits", type=int, choices=[8, 16], default=SelectionConfig.key_bits,
                   help=f"bits per number of the low-rank keys in memory (default: {SelectionConfig.key_bits})")
    p.add_argument("--select", choices=["exact", "ahead"], default="exact",
                   help="layers >= 2 attend to their own query's selection (exact) or the layer-ahead one")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    methods = [m.strip() for m in args.methods.split(",")]
    if "dense" not in methods:
        methods.insert(0, "dense")
    model_dir = resolve_model(args.model)
    tok, model, adapter = load(model_dir, args.adapter, args.calibration_tokens)
    selection = SelectionConfig(budget_tokens=args.budget, group_size=args.group_size, hysteresis=args.hysteresis,
                                residual_rank=args.residual_rank, key_rank=args.key_rank,
                                key_bits=args.key_bits)
    ref = KVSwapReference(model, "dense", selection, adapter, reselect=args.select == "exact",
                          flush_groups=args.flush_groups)
    n = args.cases_per_length
    cases = [(int(length), round((k + 0.5) / n, 3), 100 + k) for length in args.lengths.split(",") for k in range(n)]
    t0 = time.perf_counter()
    pk = passkey(model, tok, ref, methods, cases, args.answer_tokens)
    tf = teacher_forced(model, tok, ref, methods, args.context, args.positions)
    result = {
        "benchmark": "quality", "model": str(model_dir),
        "budget": {"budget_tokens": args.budget, "group_size": args.group_size, "hysteresis": args.hysteresis,
                   "rank": args.key_rank or adapter.rank, "adapter_rank": adapter.rank, "key_bits": args.key_bits,
                   "residual_rank": args.residual_rank,
                   "per_head_rank": adapter.per_head_rank, "layer_ahead": True, "selection": args.select,
                   # decoded tokens attended besides the M selected ones: the tail, 0 .. this many
                   "tail_tokens_max": args.flush_groups * args.group_size - 1},
        "passkey_cases": [{"tokens": c[0], "depth": c[1], "seed": c[2]} for c in cases],
        "methods": {m: {"passkey_acc": round(sum(pk[m]) / len(pk[m]), 4), "passkey_hits": pk[m], **tf[m]}
                    for m in methods},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    summary = {m: {k: v for k, v in r.items() if k in ("passkey_acc", "top1_agreement", "ppl", "recall")}
               for m, r in result["methods"].items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
