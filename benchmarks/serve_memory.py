"""Memory of `vllm serve` answering concurrent long chats: KVSwap decoding against stock vLLM.

    python -m benchmarks.serve_memory --out results/serve_memory.json [--chats 8] [--context 2500]

Each system is a fresh server (`kvswap serve`, enforce_eager) answering `--chats` concurrent
chats of ~context tokens (each a built-in document with its own pass key). The server's process
tree is sampled every 0.2 s; per process the resident memory is split into anonymous memory,
file pages and shared memory (/proc/PID/status: RssAnon, RssFile, RssShmem), so growth can be
told apart from vLLM's paged pool (a shared mapping) and from mapped libraries. For `kvswap`, the
KV memory is what the worker reports at its peak (hot tiers + low-rank metadata + tails); for
`vllm-full`, the dense KV of the chats' tokens. The budget check: peak RSS <= (idle RSS + KV
memory) * 1.1, idle RSS being the loaded server (weights, libraries) before any request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from benchmarks import kv_bytes_per_token, write_json
from benchmarks.server import chat, free_port, running_server
from kvswap_vllm.demo_document import build_document, entries_for_tokens
from kvswap_vllm.models.prepare import default_model_path

KINDS = ("RssAnon", "RssFile", "RssShmem")


def memory_by_process(pid: int) -> dict[str, dict[str, int]]:
    """Per process of the tree: its command's first words -> RssAnon / RssFile / RssShmem bytes."""
    root = psutil.Process(pid)
    out: dict[str, dict[str, int]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            name = f"{proc.pid}:{proc.name()}"
        except (OSError, psutil.Error):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out[name] = {k: int(fields[k].split()[0]) * 1024 for k in KINDS if k in fields}
    return out


def _total(snapshot: dict[str, dict[str, int]]) -> int:
    return sum(sum(v.values()) for v in snapshot.values())


def run_system(model: Path, system: str, chats: int, context: int, budget_tokens: int, max_new: int,
               tmp: Path) -> dict:
    docs = [build_document(num_entries=entries_for_tokens(context), depth=(i + 0.5) / chats, seed=300 + i)
            for i in range(chats)]
    stats_path = tmp / f"{system}-stats.json"
    pool_gib = chats * (context + 512) * kv_bytes_per_token(model) // 2**30 + 1  # dense KV of the chats
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(pool_gib), KVSWAP_STATS_FILE=str(stats_path))
    common = ["--host", "127.0.0.1", "--port", str(free_port()), "--dtype", "float32", "--max-model-len",
              str(context + 512), "--enforce-eager", "--max-num-seqs", str(chats)]
    if system == "kvswap":
        cfg = {"kv_connector": "kvswap", "kv_role": "kv_both",
               "kv_connector_extra_config": {"predictor": "kvswap", "budget_tokens": budget_tokens,
                                             "kv_dir": str(tmp / "kv")}}
        argv = [sys.executable, "-m", "kvswap_vllm.cli", "serve", str(model), *common,
                "--kv-transfer-config", json.dumps(cfg)]
    else:  # stock vLLM, no connector
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *common]
    with running_server(argv, env, tmp / f"{system}.log") as (base, pid):
        time.sleep(2)
        idle = memory_by_process(pid)
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                now = memory_by_process(pid)
                if _total(now) > _total(peak[0]):
                    peak[0] = now

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(chats) as pool:
            answers = list(pool.map(lambda d: chat(base, str(model), d.prompt(), max_new), docs))
        wall = time.perf_counter() - t0
        time.sleep(1)
        stop.set()
        sampler.join()
        after = memory_by_process(pid)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    if system == "kvswap":
        if stats is None:
            raise RuntimeError("the kvswap worker wrote no statistics")
        kv = stats["peak"]["kv_memory_bytes"]
    else:
        kv = chats * (context + max_new) * kv_bytes_per_token(model)
    growth = {name: {k: round((v - idle.get(name, {}).get(k, 0)) / 2**20, 1) for k, v in kinds.items()}
              for name, kinds in peak[0].items()}
    idle_mb, peak_mb = _total(idle) / 2**20, _total(peak[0]) / 2**20
    return {"system": system, "chats": chats, "context": context, "wall_s": round(wall, 1),
            "passkeys_correct": sum(d.is_correct(a) for d, a in zip(docs, answers)),
            "idle_rss_mb": round(idle_mb, 1), "peak_rss_mb": round(peak_mb, 1),
            "rss_growth_mb": round(peak_mb - idle_mb, 1), "after_rss_mb": round(_total(after) / 2**20, 1),
            "kv_memory_mb": round(kv / 2**20, 1), "dense_kv_mb": round(chats * context * kv_bytes_per_token(model) / 2**20, 1),
            "within_budget": peak_mb <= (idle_mb + kv / 2**20) * 1.1,
            "growth_by_process_mb": growth, "worker_stats": stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--context", type=int, default=2500)
    p.add_argument("--budget-tokens", type=int, default=400)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--systems", default="kvswap,vllm-full")
    args = p.parse_args(argv)
    model = args.model or default_model_path()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvswap-serve-memory-") as tmp:
        for system in args.systems.split(","):
            print(f"[serve_memory] {system}: {args.chats} chats of ~{args.context} tokens", file=sys.stderr, flush=True)
            rows.append(run_system(model, system, args.chats, args.context, args.budget_tokens,
                                   args.max_new_tokens, Path(tmp)))
            print(f"[serve_memory] {json.dumps({k: v for k, v in rows[-1].items() if k != 'worker_stats'})}",
                  file=sys.stderr, flush=True)
    print(write_json({"benchmark": "serve_memory", "model": str(model), "budget_tokens": args.budget_tokens,
                      "rows": rows}, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
