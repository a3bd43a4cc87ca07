"""Decode throughput and memory: KVSwap inside vLLM against stock vLLM with the full KV in memory
and against the other disk-offload designs, on the same engine and harness.

    python -m benchmarks.throughput --engine vllm --out results/throughput_vllm.json \\
        [--context 4000,7000] [--batch 1,4,8] [--max-new-tokens 32] [--budget-tokens 200,400,800] \\
        [--systems vllm-full,kvswap,kvswap-noreuse,kvswap-plain,kvswap-prefetch,kvswap-noprefetch,kvswap-ahead,infinigen,dense-disk] \\
        [--profiles native,emmc] [--split-io]

Systems (SYSTEMS below): `vllm-full` stock vLLM; `kvswap` (the defaults: exact selection, and
prefetch only where it pays, i.e. not on the CPU); `kvswap-noreuse` (every step reads its whole
selection); `kvswap-plain` (plain top-k: no hysteresis); `kvswap-noresidual` (attends to the selection alone, no estimate of the rest); `kvswap-rank48` (low-rank keys of rank 48); `kvswap-key16` (low-rank keys in 16 bits, not int8); `kvswap-prefetch` (step-start and layer-ahead prefetch forced on); `kvswap-noprefetch`
(each layer selects from its own query when it runs, reads on the critical path); `kvswap-ahead` (attends to the layer-ahead prediction, as the paper
does, instead of re-selecting with each layer's own query); `infinigen` (InfiniGen*-style: the
paper's low-rank predictor over single tokens, no reuse); `dense-disk` (FlexGen-style: the whole
KV read from disk every step); `llamacpp` (llama.cpp through llama-cpp-python on the GGUF the
model was prepared from, KV in memory, prompts one at a time; any engine). `--profiles`: `native` is this machine's disk as it is; a profile
name throttles every read to that device (bandwidth + latency per request) and takes its G.
`--split-io` adds compute_only_s: the same row with its disk tier in RAM (tmpfs). io_only_s is
the disk's busy time (a read in flight) per pure decode step, from the row's own run.
With --out, a PNG of the rows is written beside the JSON (benchmarks/throughput_plot.py).
`--engine hf --device cuda` runs the HF rows on a GPU (hot tier and tail in GPU memory, disk tier
and metadata host-side); benchmarks/run_gpu.sh wraps that for laptop GPUs and Jetson boards.

Each row is one fresh engine process running a batch of `batch` built-in documents of ~context
tokens (each with its own pass key) to `max-new-tokens` greedy tokens, stepping the engine by
hand: step_s is the median time of the steps in which every request of the batch decodes one
token (prefill steps excluded), tokens_per_s = batch / step_s; ttft_s is the last request's
time to first token; peak_rss_mb is the engine's whole process tree from the moment it is loaded
and idle (sampled, and each process's kernel high-water mark: short peaks count); rss_growth_mb
what the batch added to the loaded, idle engine; kv_memory_mb is what holds KV in memory: for `vllm-full` the
KV of the batch's tokens in vLLM's paged pool (sized to fit them), for `kvswap` the hot tier +
low-rank metadata + tails at their peak (vLLM's pool of the same logical size is mapped lazily
and never written). The model's weights (MB on disk) are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import kv_bytes_per_token, write_json
from benchmarks.throughput_plot import plot
from kvswap_vllm.demo_document import build_document, entries_for_tokens
from kvswap_vllm.generation import chat_prompt_ids
from kvswap_vllm.models.prepare import default_model_path
from kvswap_vllm.store.profiles import PROFILES, get_profile

#: `--profiles` value for this machine's disk as it is (no throttle).
NATIVE = "native"
#: Where the compute-only runs keep their disk tier (RAM).
RAM_DIR = "/dev/shm"


#: The systems on the KVSwap runtime: connector options on top of kv_dir and budget_tokens.
#: `vllm-full` is stock vLLM with the whole KV in its paged pool.
SYSTEMS: dict[str, dict] = {
    # The defaults (on the CPU: exact selection, no prefetch; see prefetch/policy.py).
    "kvswap": {"predictor": "kvswap"},
    "kvswap-noreuse": {"predictor": "kvswap", "reuse": False},
    # Plain top-k selection: no hysteresis towards the groups attended at the previous step.
    "kvswap-plain": {"predictor": "kvswap", "hysteresis": 0.0},
    # Attends to the selection alone: no estimate of the unselected groups' attention.
    "kvswap-noresidual": {"predictor": "kvswap", "residual_rank": 0},
    # Low-rank keys cut to the adapter's 48 leading basis columns (metadata -25% at rank 64).
    "kvswap-rank48": {"predictor": "kvswap", "key_rank": 48},
    # Low-rank keys in 16 bits (the default is int8 with a scale per token).
    "kvswap-key16": {"predictor": "kvswap", "key_bits": 16},
    "kvswap-prefetch": {"predictor": "kvswap", "prefetch": True},
    "kvswap-noprefetch": {"predictor": "kvswap", "prefetch": False},
    # Attends to the layer-ahead prediction, as the paper does (no exact re-selection).
    "kvswap-ahead": {"predictor": "kvswap", "reselect": False, "prefetch": True},
    # InfiniGen*-style: the paper's low-rank predictor over single tokens, read every step,
    # attending to the layer-ahead prediction.
    "infinigen": {"predictor": "kvswap-paper", "group_size": 1, "reuse": False, "reselect": False, "prefetch": True},
    # FlexGen-style dense offload: every token of every layer read from disk at every step.
    "dense-disk": {"predictor": "dense", "reuse": False},
}


def _child(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["pool_gib"])
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvswap_vllm.resources import ResourceMeter, tree_rss_bytes

    ktc = None
    if spec["options"] is not None:
        extra = {"kv_dir": spec["kv_dir"], "budget_tokens": spec["budget_tokens"], **spec["options"]}
        ktc = {"kv_connector": "kvswap", "kv_role": "kv_both", "kv_connector_extra_config": extra}
    with ResourceMeter() as meter:
        llm = LLM(model=spec["model"], dtype="float32", max_model_len=spec["max_model_len"], enforce_eager=True,
                  seed=0, disable_log_stats=False, kv_transfer_config=ktc, max_num_seqs=max(8, spec["batch"]))
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], ignore_eos=True)
        idle_rss = tree_rss_bytes()  # the engine loaded, no request yet
        meter.reset_peak()
        engine = llm.llm_engine
        for i, prompt in enumerate(spec["prompts"]):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
        # Drive the engine step by step: a step in which every request already had its first
        # token and gains one more is a pure decode step of the whole batch.
        counts = [0] * len(spec["prompts"])
        texts = [""] * len(spec["prompts"])
        first_token_s = [0.0] * len(spec["prompts"])
        decode_steps: list[float] = []
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            before = list(counts)
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            for o in outs:
                i = int(o.request_id)
                counts[i], texts[i] = len(o.outputs[0].token_ids), o.outputs[0].text
                if before[i] == 0 and counts[i] > 0:
                    first_token_s[i] = time.perf_counter() - t0
            if all(b > 0 for b in before) and all(c == b + 1 for c, b in zip(counts, before)):
                decode_steps.append(dt)
        wall = time.perf_counter() - t0
        llm.llm_engine.engine_core.shutdown()
    step_s = statistics.median(decode_steps) if decode_steps else float("nan")
    out_path.write_text(json.dumps({
        "texts": texts, "step_s": step_s, "tokens_per_s": len(counts) / step_s, "decode_steps": len(decode_steps),
        "ttft_s": max(first_token_s), "wall_s": wall,
        "peak_rss_mb": meter.usage.peak_rss_bytes / 2**20, "idle_rss_mb": idle_rss / 2**20,
        "disk_read_mb": meter.usage.disk_read_bytes / 2**20,
    }))


def system_options(system: str, profile: str, model: Path, budget_tokens: int,
                   group_size: int | None = None) -> dict | None:
    """Connector options of `system` under a storage profile (None: stock vLLM). `native` reads
    this machine's disk as it is; a profile name throttles the reads to that device and, for
    systems that do not fix G, takes the profile's group size. `group_size`: G of the systems
    that do not fix it, whatever the profile."""
    if system == "vllm-full":
        return None
    options = dict(SYSTEMS[system])
    if profile != NATIVE:
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        g = get_profile(profile).group_size(kv_bytes_per_token(model) // layers, budget_tokens)
        options = {"group_size": g, **options, "storage_profile": profile, "throttle_reads": True}
    if group_size is not None and "group_size" not in SYSTEMS[system]:
        options["group_size"] = group_size
    return options


def compute_only_options(options: dict) -> dict:
    """The same system with its disk tier in RAM (tmpfs, buffered, no throttle): every cost of a
    step but the storage device's."""
    return {**{k: v for k, v in options.items() if k not in ("storage_profile", "throttle_reads")},
            "direct_io": "off"}


def _run_child(spec: dict) -> tuple[dict, dict | None]:
    """One engine process for `spec`: (its output, the kvswap worker's statistics or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path, stats_path = (Path(tmp) / n for n in ("spec.json", "out.json", "stats.json"))
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "KVSWAP_STATS_FILE": str(stats_path)}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--child", str(spec_path), str(out_path)],
                              capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['system']} batch {spec['batch']} failed:\n{proc.stderr[-4000:]}")
        out = json.loads(out_path.read_text())
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    if spec["options"] is not None and stats is None and spec["engine"] == "vllm":
        raise RuntimeError("the kvswap worker wrote no memory statistics")
    return out, stats


#: Systems of `--engine hf` (HF transformers, one prompt at a time): its own dense cache, or KVSwap.
HF_SYSTEMS = ("hf-full", "kvswap", "kvswap-plain", "kvswap-noresidual", "kvswap-rank48", "kvswap-key16", "kvswap-prefetch", "kvswap-noprefetch")


def _child_hf(spec_path: Path, out_path: Path) -> None:
    """One HF process: the batch's prompts one after another (the HF runtime decodes one
    sequence at a time); decode time is from each prompt's first token to its last."""
    spec = json.loads(spec_path.read_text())
    from kvswap_vllm.generation import GenerationConfig, KVSwapOptions, create_generator
    from kvswap_vllm.resources import ResourceMeter, tree_rss_bytes

    opts = spec["options"]
    kv = KVSwapOptions(predictor=None) if opts is None else KVSwapOptions(
        predictor=opts["predictor"], budget_tokens=spec["budget_tokens"], group_size=opts.get("group_size", 4),
        kv_dir=Path(spec["kv_dir"]), storage_profile=opts.get("storage_profile"), prefetch=opts.get("prefetch"),
        hysteresis=opts.get("hysteresis"), residual_rank=opts.get("residual_rank"),
        key_rank=opts.get("key_rank"), key_bits=opts.get("key_bits"))
    device = spec.get("device", "cpu")
    # Every prompt decodes max_new_tokens steps whatever it says, as the vLLM rows (ignore_eos).
    config = GenerationConfig(model=Path(spec["model"]), max_new_tokens=spec["max_new_tokens"], ignore_eos=True,
                              max_model_len=spec["max_model_len"], device=device, kvswap=kv)
    with ResourceMeter() as meter:
        gen = create_generator("hf", config)
        # Warm = every code path has run once: a prompt past the budget (chunked prefill over
        # disk blocks, sparse decode, helper threads); else the batch's RSS growth would count
        # the library code it pages in and the helper threads' malloc arenas as KV memory.
        gen.generate([spec["prompts"][0][:WARMUP_TOKENS]])
        idle_rss, gpu_idle = tree_rss_bytes(), _gpu_memory(device, reset=True)
        meter.reset_peak()
        t0 = time.perf_counter()
        results = gen.generate(spec["prompts"])
        wall = time.perf_counter() - t0
        gen.close()
    steps = sum(r.new_tokens - 1 for r in results)
    step_s = sum(r.decode_s for r in results) / max(1, steps)
    kv_peak = max((sum(r.extra.get(k, 0) for k in ("hot_tier_bytes", "metadata_bytes", "tail_bytes")) for r in results),
                  default=0)
    out_path.write_text(json.dumps({
        "texts": [r.text for r in results], "step_s": step_s, "tokens_per_s": 1 / step_s, "decode_steps": steps,
        "ttft_s": max(r.ttft_s for r in results), "wall_s": wall, "kv_peak_bytes": kv_peak,
        "peak_rss_mb": meter.usage.peak_rss_bytes / 2**20, "idle_rss_mb": idle_rss / 2**20,
        "disk_read_mb": meter.usage.disk_read_bytes / 2**20,
        # GPU memory the batch added to the loaded, warm model (peak allocated by torch).
        "gpu_growth_mb": None if gpu_idle is None else (_gpu_memory(device) - gpu_idle) / 2**20,
    }))


#: Prompt tokens of the HF rows' warm-up request (> 2 prefill chunks and > the budget).
WARMUP_TOKENS = 2500


def _gpu_memory(device: str, reset: bool = False) -> int | None:
    """Bytes torch holds on a CUDA `device` (reset: now, and restart the peak count), else
    the peak since the reset; None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize(device)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return torch.cuda.max_memory_allocated(device)


#: The llama.cpp baseline (llama-cpp-python): the model's GGUF with its KV cache in memory (f16,
#: llama.cpp's default), prompts one at a time; the on-device engine people use today.
LLAMACPP = "llamacpp"


def _child_llamacpp(spec_path: Path, out_path: Path) -> None:
    """One llama.cpp process: the batch's prompts one after another, greedy; decode time is from
    each prompt's first token to its last."""
    spec = json.loads(spec_path.read_text())
    from llama_cpp import Llama

    from kvswap_vllm.resources import ResourceMeter, tree_rss_bytes

    with ResourceMeter() as meter:
        llm = Llama(model_path=spec["gguf"], n_ctx=spec["max_model_len"], n_threads=os.cpu_count(),
                    n_batch=512, seed=0, verbose=False)
        _llamacpp_generate(llm, spec["prompts"][0][:16], 2)  # touches every weight: idle = loaded and warm
        idle_rss = tree_rss_bytes()
        meter.reset_peak()
        t0 = time.perf_counter()
        results = [_llamacpp_generate(llm, p, spec["max_new_tokens"]) for p in spec["prompts"]]
        wall = time.perf_counter() - t0
        n_ctx = llm.n_ctx()
        texts = [llm.detokenize(tokens).decode("utf-8", "replace") for tokens, _, _ in results]
        llm.close()
    steps = sum(len(tokens) - 1 for tokens, _, _ in results)
    step_s = sum(decode for _, _, decode in results) / max(1, steps)
    out_path.write_text(json.dumps({
        "texts": texts, "step_s": step_s, "tokens_per_s": 1 / step_s, "decode_steps": steps,
        "ttft_s": max(ttft for _, ttft, _ in results), "wall_s": wall, "n_ctx": n_ctx,
        "peak_rss_mb": meter.usage.peak_rss_bytes / 2**20, "idle_rss_mb": idle_rss / 2**20,
        "disk_read_mb": meter.usage.disk_read_bytes / 2**20,
    }))


def _llamacpp_generate(llm, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens of one prompt (max_new_tokens of them, past end-of-sequence as the other
    rows), time to first token, decode time (first -> last token)."""
    tokens: list[int] = []
    t0 = time.perf_counter()
    t_first = t0
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if not tokens:
            t_first = time.perf_counter()
        tokens.append(token)
        if len(tokens) >= max_new_tokens:
            break
    return tokens, t_first - t0, time.perf_counter() - t_first


def model_gguf(model: Path) -> Path:
    """The GGUF `model` was prepared from (kvswap model prepare records it), for llama.cpp; the
    default model's comes from its PyPI package."""
    from kvswap_vllm.models.prepare import default_gguf_path

    record = model / "kvswap_model.json"
    if record.is_file():
        source = Path(json.loads(record.read_text()).get("source", ""))
        if source.is_file():
            return source
    if model.resolve() == default_model_path().resolve():
        return default_gguf_path()
    raise SystemExit(f"throughput: system {LLAMACPP} needs the GGUF of {model}; pass --gguf PATH")


def run_row(model: Path, system: str, context: int, batch: int, max_new_tokens: int, budget_tokens: int,
            kv_dir: Path, profile: str = NATIVE, split_io: bool = False, engine: str = "vllm",
            device: str = "cpu", gguf: Path | None = None, group_size: int | None = None) -> dict:
    docs = [build_document(num_entries=entries_for_tokens(context), depth=(i + 0.5) / batch, seed=100 + i)
            for i in range(batch)]
    prompts = [chat_prompt_ids(model, d.prompt()) for d in docs]
    longest = max(len(p) for p in prompts) + max_new_tokens
    need = batch * (longest + 128) * kv_bytes_per_token(model)
    options = None if system in ("hf-full", LLAMACPP) else system_options(system, profile, model, budget_tokens,
                                                                          group_size)
    engine = LLAMACPP if system == LLAMACPP else engine
    spec = {"model": str(model), "system": system, "engine": engine, "gguf": str(gguf or ""), "options": options, "prompts": prompts, "batch": batch,
            "kv_dir": str(kv_dir), "device": device, "max_new_tokens": max_new_tokens, "budget_tokens": budget_tokens,
            "max_model_len": longest + 128, "pool_gib": max(1, math.ceil(need * 1.1 / 2**30))}
    out, stats = _run_child(spec)
    compute_only_s, io_only_s = None, None
    if engine == LLAMACPP:  # its KV cache: n_ctx tokens, f16 (half of kv_bytes_per_token's fp32)
        kv_memory = out["n_ctx"] * kv_bytes_per_token(model) // 2
    elif engine == "hf":  # one sequence at a time: the KV held at once is one sequence's
        kv_memory = (max(len(p) for p in prompts) + max_new_tokens) * kv_bytes_per_token(model) \
            if options is None else out["kv_peak_bytes"]
    elif options is None:
        kv_memory = sum(len(p) + max_new_tokens for p in prompts) * kv_bytes_per_token(model)
        compute_only_s, io_only_s = out["step_s"], 0.0  # nothing is read
    else:
        kv_memory = stats["peak"]["kv_memory_bytes"]
    if engine == "vllm" and options is not None:
        io = stats.get("decode_io") or {}
        if io.get("steps"):
            io_only_s = io["read_busy_s"] / io["steps"]
        if split_io:
            with tempfile.TemporaryDirectory(prefix="kvswap-compute-only-", dir=RAM_DIR) as ram:
                mem, _ = _run_child({**spec, "options": compute_only_options(options), "kv_dir": ram})
            compute_only_s = mem["step_s"]
    weights = Path(gguf).stat().st_size if engine == LLAMACPP else sum(f.stat().st_size for f in model.glob("*.safetensors"))
    bound = max(compute_only_s, io_only_s) if compute_only_s is not None and io_only_s is not None else None
    return {
        "system": system, "engine": engine, "device": device,
        "context": round(sum(map(len, prompts)) / batch), "batch": batch,
        "profile": profile, "group_size": None if options is None else options.get("group_size", 4),
        "budget_tokens": None if options is None else budget_tokens,
        "tokens_per_s": round(out["tokens_per_s"], 2), "step_s": round(out["step_s"], 4),
        # Step time with the disk tier in RAM, and the disk's busy time per decode step: a step
        # that overlaps reads with compute perfectly takes max(compute_only_s, io_only_s).
        "compute_only_s": _round(compute_only_s), "io_only_s": _round(io_only_s),
        "step_over_bound": _round(out["step_s"] / bound if bound else None, 3),
        "decode_steps_measured": out["decode_steps"], "ttft_s": round(out["ttft_s"], 2), "wall_s": round(out["wall_s"], 1),
        "peak_rss_mb": round(out["peak_rss_mb"], 1), "kv_memory_mb": round(kv_memory / 2**20, 1),
        # What serving the batch added to the loaded, idle engine's resident memory.
        "rss_growth_mb": round(out["peak_rss_mb"] - out["idle_rss_mb"], 1),
        "gpu_growth_mb": _round(out.get("gpu_growth_mb"), 1),
        "weights_mb": round(weights / 2**20, 1), "vllm_pool_gib": spec["pool_gib"] if engine == "vllm" else None,
        "passkeys_correct": sum(d.is_correct(t) for d, t in zip(docs, out["texts"])),
        "memory_detail_mb": {k: round(v / 2**20, 2) for k, v in stats["peak"].items() if k.endswith("bytes")}
        if stats else None,
        # kvswap: groups read and found useful per mechanism (step-ahead, layer-ahead, own query).
        "reads_by_source": stats.get("reads") if stats else None,
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


#: Systems that hold the whole KV in memory and read nothing: no budget, no storage profile.
STOCK = ("vllm-full", "hf-full", LLAMACPP)


def plan_cases(contexts: list[int], batches: list[int], profiles: list[str], systems: list[str],
               budgets: list[int]) -> list[tuple[int, int, str, str, int]]:
    """(context, batch, profile, system, budget) of every row; a stock system runs once per
    (context, batch), whatever the profiles and budgets."""
    return [(c, b, prof, sys_, m) for c in contexts for b in batches for prof in profiles for sys_ in systems
            for m in budgets if not (sys_ in STOCK and (prof != profiles[0] or m != budgets[0]))]


def median_run(runs: list[dict]) -> dict:
    """One case's row from its runs: the run with the median step time (the lower of the two
    middle ones), with every run's step_s; a single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: (r.get("step_s") is None, r.get("step_s") or 0.0))
    return {**ordered[(len(runs) - 1) // 2], "runs_step_s": [r.get("step_s") for r in runs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm",
                   help=f"vllm, or hf (HF transformers, prompts one at a time; systems {', '.join(HF_SYSTEMS)})")
    p.add_argument("--out", type=Path)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--context", default="7000", help="prompt tokens, comma-separated (default: 7000)")
    p.add_argument("--batch", default="1,4,8")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--budget-tokens", default="400",
                   help="M, tokens of full groups attended per layer per sequence, comma-separated (a sweep; "
                        "the stock systems hold everything and run once)")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated: vllm-full, {', '.join(SYSTEMS)} (default: vllm-full,kvswap; "
                        "--engine hf: hf-full,kvswap)")
    p.add_argument("--profiles", default=NATIVE,
                   help=f"comma-separated storage profiles: {NATIVE} (this disk as it is), or {', '.join(PROFILES)} "
                        "(reads throttled to that device; G from the profile)")
    p.add_argument("--group-size", type=int, default=None,
                   help="G of the KVSwap systems that do not fix it (default: 4 on the native disk, else the "
                        "profile's)")
    p.add_argument("--split-io", action="store_true",
                   help="also run each disk system with its disk tier in RAM (compute_only_s; one more engine per row)")
    p.add_argument("--device", default="cpu",
                   help="--engine hf: cpu (default), cuda or cuda:N (vLLM runs where it was built for)")
    p.add_argument("--gguf", type=Path, default=None,
                   help=f"system {LLAMACPP}: the model's GGUF (default: the one it was prepared from)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every case this many times, the cases taking turns (a noisy machine's slow spells then "
                        "fall on every system alike); a row has the figures of its median run and each run's step_s")
    p.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        engine = json.loads(args.child[0].read_text())["engine"]
        {"hf": _child_hf, LLAMACPP: _child_llamacpp}.get(engine, _child)(*args.child)
        return 0
    known = (*(HF_SYSTEMS if args.engine == "hf" else ("vllm-full", *SYSTEMS)), LLAMACPP)
    systems, profiles = (args.systems or ",".join(known[:2])).split(","), args.profiles.split(",")
    unknown = sorted(set(systems) - set(known))
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)} for --engine {args.engine}; known: {', '.join(known)}")
    bad = sorted(set(profiles) - {NATIVE, *PROFILES})
    if bad:
        p.error(f"unknown profile(s) {', '.join(bad)}; known: {NATIVE}, {', '.join(PROFILES)}")
    if args.device != "cpu" and args.engine != "hf":
        p.error("--device is for --engine hf; vLLM runs on the platform it was built for")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.split_io and not os.path.isdir(RAM_DIR):
        p.error(f"--split-io keeps a disk tier in RAM under {RAM_DIR}, which this machine lacks")
    model = args.model or default_model_path()
    try:
        budgets = [int(x) for x in args.budget_tokens.split(",")]
    except ValueError:
        p.error(f"--budget-tokens takes comma-separated token counts, got {args.budget_tokens!r}")
    if min(budgets) < 1:
        p.error(f"--budget-tokens must be positive, got {args.budget_tokens!r}")
    if args.group_size is not None and not 1 <= args.group_size <= min(budgets):
        p.error(f"--group-size must be between 1 and the smallest budget ({min(budgets)}), got {args.group_size}")
    cases = plan_cases([int(x) for x in args.context.split(",")], [int(x) for x in args.batch.split(",")],
                       profiles, systems, budgets)
    runs: list[list[dict]] = [[] for _ in cases]
    total = len(cases) * args.repeats
    with tempfile.TemporaryDirectory(prefix="kvswap-throughput-") as kv:
        for n, (i, (context, batch, profile, system, budget)) in enumerate(
                ((i, case) for _ in range(args.repeats) for i, case in enumerate(cases)), 1):
            print(f"[throughput {n}/{total}] {system} batch {batch} context ~{context} profile {profile}"
                  + ("" if system in STOCK else f" M {budget}") + " ...", file=sys.stderr, flush=True)
            row = run_row(model, system, context, batch, args.max_new_tokens, budget, Path(kv),
                          profile, args.split_io and args.engine == "vllm", args.engine, args.device,
                          args.gguf or (model_gguf(model) if system == LLAMACPP else None), args.group_size)
            print(f"[throughput] {json.dumps(row)}", file=sys.stderr, flush=True)
            runs[i].append(row)
    rows = [median_run(r) for r in runs]
    result = {"benchmark": "throughput", "engine": args.engine, "device": args.device, "model": str(model),
              "budget_tokens": budgets[0] if len(budgets) == 1 else budgets, "max_new_tokens": args.max_new_tokens,
              "repeats": args.repeats, "rows": rows}
    if args.device != "cpu":
        import torch

        result["gpu"] = torch.cuda.get_device_name(args.device)
    print(write_json(result, args.out))
    if args.out is not None:
        plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
