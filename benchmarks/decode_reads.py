"""The disk tier under decode's load pattern: one layer's missing groups, scattered, per load.

    python -m benchmarks.decode_reads --out results/decode_reads.json [--threads 1,2,4,8]

A sequence of ~7k tokens of SmolLM2-135M's shape (3 KV heads x 64 dims, G = 4, float32: 6 KiB
a group) is written to one layer of a store; each load then reads `--groups` random groups of
it (what a decode step's layer misses at M = 400: ~16), for each read-thread count. Reported
per load and per group: wall time and the process's CPU time (user + system), which on a
2-core machine is what the forward pass loses to the reads.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_json
from kvswap_vllm.store import DiskStore, StoreConfig

HEADS, HEAD_DIM, GROUP, DTYPE = 3, 64, 4, "float32"
FP = "dec0de" * 4


def measure(root: Path, threads: int, groups: int, loads: int, total_groups: int, seed: int) -> dict:
    config = StoreConfig(root=root, model_fingerprint=FP, num_layers=1, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                         group_size=GROUP, dtype=DTYPE, io_threads=threads)
    with DiskStore(config) as store:
        store.open_sequence("seq", private=False)
        if store.num_groups("seq", 0) < total_groups:
            for first in range(0, total_groups, 64):  # files of 64 groups, as the rolling tail flushes
                store.write_groups("seq", 0, first, torch.randn(64, HEADS, 2, GROUP, HEAD_DIM))
            store.flush()
        rng = random.Random(seed)
        out = torch.empty(groups, HEADS, 2, GROUP, HEAD_DIM)
        picks = [sorted(rng.sample(range(total_groups), groups)) for _ in range(loads + 20)]
        for ids in picks[:20]:  # warm-up: files open, buffers mapped
            store.read_groups("seq", 0, ids, out=out)
        wall, cpu = time.perf_counter(), time.process_time()
        for ids in picks[20:]:
            if not store.read_groups("seq", 0, ids, out=out).found.all():
                raise RuntimeError("a group written by this benchmark was not found")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        direct = store._direct
    return {"threads": threads, "groups_per_load": groups, "loads": loads, "direct_io": direct,
            "wall_ms_per_load": round(wall / loads * 1e3, 3), "cpu_ms_per_load": round(cpu / loads * 1e3, 3),
            "wall_us_per_group": round(wall / loads / groups * 1e6, 1),
            "cpu_us_per_group": round(cpu / loads / groups * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON output")
    p.add_argument("--dir", type=Path, default=None, help="folder on the device to test (default: a temp folder)")
    p.add_argument("--threads", default="1,2,4,8", help="read threads per load to compare (default: 1,2,4,8)")
    p.add_argument("--groups", type=int, default=16, help="groups per load (default: 16)")
    p.add_argument("--loads", type=int, default=300, help="loads per thread count (default: 300)")
    p.add_argument("--context", type=int, default=7000, help="tokens of the sequence read from (default: 7000)")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    total = args.context // GROUP
    if min(threads) < 1 or not 0 < args.groups <= total or args.loads < 1:
        p.error("need threads >= 1, 0 < groups <= context / 4 and loads >= 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for t in threads:
            rows.append(measure(Path(tmp), t, args.groups, args.loads, total, seed=t))
            print(f"decode_reads: {t} thread(s): {rows[-1]['wall_ms_per_load']} ms wall, "
                  f"{rows[-1]['cpu_ms_per_load']} ms CPU per load of {args.groups} groups", flush=True)
    write_json({"machine": platform.node(), "cpus": os.cpu_count(), "group_bytes": HEADS * HEAD_DIM * 2 * GROUP * 4,
                "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
