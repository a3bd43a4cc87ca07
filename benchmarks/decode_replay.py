"""KVSwap's side of a vLLM decode step, without the model: where the time goes.

    python -m benchmarks.decode_replay --out results/decode_replay.json [--batch 8] [--context 7000] [--steps 20]

`--batch` sequences of the default model's shape (30 layers, 9 query / 3 KV heads x 64 dims,
G = 4, M = 400, rank-64 metadata with the model's calibrated adapter) hold `--context` random
tokens each in a real disk tier. Each step then runs, per layer, what the vLLM backend runs
for a batch of decoding requests: one batched selection from the queries (near-constant
queries with noise, so ~80% of a selection stays resident as with the real model), one store
call for every sequence's missing groups, then per request the hot tier's K/V plus the tail
and the grouped-query attention. Reported per step (median) and per part (mean): selection,
reads, hot-tier bookkeeping, gather/tail/attention; the model's own compute is not in it.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks import write_json
from kvswap_vllm.hot import tier
from kvswap_vllm.attention.sparse import decode_attention
from kvswap_vllm.models.fingerprint import model_fingerprint
from kvswap_vllm.models.prepare import default_model_path
from kvswap_vllm.predict import base as predict_base
from kvswap_vllm.predict.adapter import adapter_for
from kvswap_vllm.predict.base import ModelShape, SelectionConfig
from kvswap_vllm.prefetch.policy import decode_io_threads
from kvswap_vllm.runtime import sequence as runtime_sequence
from kvswap_vllm.runtime.sequence import DiskRuntimeConfig, KVSwapSequence
from kvswap_vllm.store import DiskStore, StoreConfig
from kvswap_vllm.store import disk_store as store_module

SHAPE = ModelShape(num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64)


class Timers:
    """Seconds spent in wrapped functions, by (variant running, part)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[tuple[int, str]] = collections.Counter()
        self.variant = 0

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[self.variant, part] += time.perf_counter() - t0
        return timed


def attend(seq: KVSwapSequence, layer: int, q: torch.Tensor, new_kv: torch.Tensor) -> None:
    """What the vLLM backend does for one decoding request once its groups are resident."""
    kk, vv = seq.decode_kv(layer, new_kv[0], new_kv[1], q)
    decode_attention(q.unsqueeze(1), kk, vv, SHAPE.head_dim ** -0.5, seq.rest(layer))


def replay(root: Path, batch: int, context: int, steps: int, kernel_aio: bool, parts: list[int],
           seed: int = 0) -> list[dict]:
    """One row per value of `parts`, the values taking turns step by step on the same sequences
    (so a noisy machine's slow spells fall on all of them alike)."""
    torch.manual_seed(seed)
    fp = model_fingerprint(default_model_path())
    adapter = adapter_for("kvswap", fp, SHAPE.head_dim)
    cfg = StoreConfig(root=root, model_fingerprint=fp, num_layers=SHAPE.num_layers, num_kv_heads=SHAPE.num_kv_heads,
                      head_dim=SHAPE.head_dim, group_size=4, io_threads=decode_io_threads(8), kernel_aio=kernel_aio)
    config = DiskRuntimeConfig(SelectionConfig(400, 4), "kvswap", prefetch=False)
    timers = Timers()
    patches = [(predict_base, "select_batch", "selection"), (runtime_sequence, "select_batch", "selection"),
               (store_module.DiskStore, "start_reads", "reads"), (store_module.PendingReads, "wait", "reads"),
               (tier.HotTier, "_plan", "hot-tier bookkeeping"),
               (tier.HotTier, "_finish", "hot-tier bookkeeping")]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, part in patches:
        setattr(obj, name, timers.wrap(part, getattr(obj, name)))
    try:
        with DiskStore(cfg) as store:
            seqs = [KVSwapSequence(store, SHAPE, config, adapter) for _ in range(batch)]
            for seq in seqs:  # the prompt: full groups on disk, the rest in the tail
                for layer in range(SHAPE.num_layers):
                    seq._append(layer, torch.randn(3, context, 64), torch.randn(3, context, 64))
                    seq._flush(layer, (context // 4) * 4 - 16)
            store.flush()
            direct, aio_used = store.stats.direct_io, store.stats.kernel_aio
            base_q = torch.randn(batch, SHAPE.num_layers, SHAPE.num_q_heads, SHAPE.head_dim) * 2
            times: dict[int, list[float]] = {n: [] for n in parts}
            warm = 3
            for step in range(steps + warm):
                for n in parts:
                    timers.variant = n
                    if step == warm:
                        timers.seconds = collections.Counter({k: v for k, v in timers.seconds.items() if k[0] != n})
                    t0 = time.perf_counter()
                    for layer in range(SHAPE.num_layers):
                        q = base_q[:, layer] + 0.3 * torch.randn(batch, SHAPE.num_q_heads, SHAPE.head_dim)
                        new_kv = torch.randn(batch, 2, 3, 1, 64)
                        runtime_sequence.decode_in_parts(seqs, layer, q, timers.wrap(
                            "gather, tail, attention", lambda i: attend(seqs[i], layer, q[i], new_kv[i])), n)
                    times[n].append(time.perf_counter() - t0)
            reads = sum(s.prefetch.stats.by_source["own"].groups_read for s in seqs)
            for seq in seqs:
                seq.close()
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
    per_layer = round(reads / ((steps + warm) * len(parts) * SHAPE.num_layers * batch), 1)
    return [{"kernel_aio": aio_used, "direct_io": direct, "parts": n, "batch": batch, "context": context, "steps": steps,
             "step_s": round(statistics.median(times[n][warm:]), 4),
             "parts_s_per_step": {k: round(v / steps, 4) for (m, k), v in sorted(timers.seconds.items()) if m == n},
             "groups_read_per_layer_per_sequence": per_layer} for n in parts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON output")
    p.add_argument("--batch", type=int, default=8, help="sequences (default: 8)")
    p.add_argument("--context", type=int, default=7000, help="tokens per sequence (default: 7000)")
    p.add_argument("--steps", type=int, default=20, help="decode steps measured (default: 20)")
    p.add_argument("--parts", type=int, nargs="+", default=[runtime_sequence.DECODE_PARTS],
                   help="parts a layer's loads are split into (each value a row, taking turns step by step; "
                   "default: %(default)s)")
    p.add_argument("--dir", type=Path, default=None, help="folder on the device to test (default: a temp folder)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.context < 500 or args.steps < 1 or min(args.parts) < 1:
        p.error("need batch >= 1, context >= 500, steps >= 1 and parts >= 1")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kernel_aio, parts in ((True, args.parts), (False, args.parts[:1])):
            rows += replay(Path(tmp) / f"aio{int(kernel_aio)}", args.batch, args.context, args.steps, kernel_aio, parts)
            for row in rows[-len(parts):]:
                print(f"decode_replay: kernel_aio={row['kernel_aio']}, parts={row['parts']}: {row['step_s']} s per "
                      f"step, {row['parts_s_per_step']}", flush=True)
    write_json({"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
