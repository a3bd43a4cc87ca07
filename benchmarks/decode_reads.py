"""The disk tier under decode's load pattern: one layer's missing groups, scattered, per load.

    python -m benchmarks.decode_reads --out results/decode_reads.json [--threads 1,2,4,8] \
        [--engines aio,threads] [--batch 8]

`--batch` sequences of ~7k tokens of SmolLM2-135M's shape (3 KV heads x 64 dims, G = 4,
float32: 6 KiB a group) are written to one layer of a store; each load then reads `--groups`
random groups of each (what a decode step's layer misses per sequence at M = 400: ~16), in one
store call, as a step of a batch does. Engines: `aio` (kernel AIO: the call's reads go to the
kernel together; thread counts do not apply) and `threads` (preadv from each thread count).
Reported per load and per group: wall time and the process's CPU time (user + system), which on
a 2-core machine is what the forward pass loses to the reads.
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
from kvswap_vllm.store import DiskStore, ReadRequest, StoreConfig, aio

HEADS, HEAD_DIM, GROUP, DTYPE = 3, 64, 4, "float32"
FP = "dec0de" * 4


def measure(root: Path, engine: str, threads: int, groups: int, batch: int, loads: int, total_groups: int,
            seed: int) -> dict | None:
    config = StoreConfig(root=root, model_fingerprint=FP, num_layers=1, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                         group_size=GROUP, dtype=DTYPE, io_threads=threads, kernel_aio=engine == "aio")
    names = [f"seq{i}" for i in range(batch)]
    with DiskStore(config) as store:
        for name in names:
            store.open_sequence(name, private=False)
            if store.num_groups(name, 0) < total_groups:
                for first in range(0, total_groups, 64):  # files of 64 groups, as the rolling tail flushes
                    store.write_groups(name, 0, first, torch.randn(min(64, total_groups - first), HEADS, 2, GROUP, HEAD_DIM))
        store.flush()
        if engine == "aio" and not store.stats.kernel_aio:
            return None  # no O_DIRECT in this folder: nothing to measure
        rng = random.Random(seed)
        outs = [torch.empty(groups, HEADS, 2, GROUP, HEAD_DIM) for _ in names]
        picks = [[ReadRequest(n, 0, sorted(rng.sample(range(total_groups), groups)), o) for n, o in zip(names, outs)]
                 for _ in range(loads + 20)]
        for requests in picks[:20]:  # warm-up: files open, buffers mapped
            store.read_many(requests)
        wall, cpu = time.perf_counter(), time.process_time()
        for requests in picks[20:]:
            if not all(r.found.all() for r in store.read_many(requests)):
                raise RuntimeError("a group written by this benchmark was not found")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        direct = store._direct
    n = groups * batch
    return {"engine": engine, "threads": threads if engine == "threads" else None, "sequences": batch,
            "groups_per_load": n, "loads": loads, "direct_io": direct,
            "wall_ms_per_load": round(wall / loads * 1e3, 3), "cpu_ms_per_load": round(cpu / loads * 1e3, 3),
            "wall_us_per_group": round(wall / loads / n * 1e6, 1), "cpu_us_per_group": round(cpu / loads / n * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON output")
    p.add_argument("--dir", type=Path, default=None, help="folder on the device to test (default: a temp folder)")
    p.add_argument("--threads", default="1,2,4,8", help="read threads per load to compare (default: 1,2,4,8)")
    p.add_argument("--engines", default="aio,threads", help="read engines to compare (default: aio,threads)")
    p.add_argument("--groups", type=int, default=16, help="groups per sequence per load (default: 16)")
    p.add_argument("--batch", type=int, default=8, help="sequences read per load (default: 8)")
    p.add_argument("--loads", type=int, default=300, help="loads per thread count (default: 300)")
    p.add_argument("--context", type=int, default=7000, help="tokens of the sequence read from (default: 7000)")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    engines = args.engines.split(",")
    total = args.context // GROUP
    if min(threads) < 1 or not 0 < args.groups <= total or args.loads < 1 or args.batch < 1:
        p.error("need threads >= 1, 0 < groups <= context / 4, loads >= 1 and batch >= 1")
    if not set(engines) <= {"aio", "threads"}:
        p.error(f"unknown engine in {args.engines!r}; engines: aio, threads")
    if "aio" in engines and not aio.available():
        print("decode_reads: no kernel AIO on this machine; skipping the aio engine", flush=True)
        engines.remove("aio")
    torch.set_num_threads(1)
    runs = [(e, t) for e in engines for t in (threads if e == "threads" else threads[:1])]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for i, (engine, t) in enumerate(runs):
            row = measure(Path(tmp), engine, t, args.groups, args.batch, args.loads, total, seed=i)
            if row is None:
                print(f"decode_reads: no O_DIRECT in {tmp}, so no kernel AIO; skipping the aio engine", flush=True)
                continue
            rows.append(row)
            what = "kernel AIO" if engine == "aio" else f"{t} thread(s)"
            print(f"decode_reads: {what}: {rows[-1]['wall_ms_per_load']} ms wall, {rows[-1]['cpu_ms_per_load']} ms "
                  f"CPU per load of {args.batch} x {args.groups} groups", flush=True)
    write_json({"machine": platform.node(), "cpus": os.cpu_count(), "group_bytes": HEADS * HEAD_DIM * 2 * GROUP * 4,
                "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
