"""Disk-tier benchmark: the store against raw O_DIRECT reads/writes of the same bytes, side by side.

    python -m benchmarks.store_bench --out results/store.json      # also writes results/store.png

For each group size, the same files are read (a) raw, with O_DIRECT at exactly the request
sizes the store issues, and (b) through DiskStore (checksums verified, groups copied into a
destination tensor), with adjacent groups coalesced into extents and without. Selections cover
25% of the groups in clusters, as attention selections do. Then ~2 GB of groups are read while
RSS and the page-cache residency of the block files are watched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from kvswap_vllm.store import DiskStore, StoreConfig
from kvswap_vllm.store.disk_store import ReadResult
from kvswap_vllm.store.fileio import align_up as fileio_align_up, aligned_buffer, aligned_tensor
from kvswap_vllm.store.format import open_segment
from kvswap_vllm.store.probe import read_extents, resident_bytes
from kvswap_vllm.store.profiles import PROFILES

# A Llama-3-8B-like layer in fp16: 8 KV heads x 128 dims x K,V x 2 bytes = 4 KiB per token.
HEADS, HEAD_DIM, DTYPE = 8, 128, "float16"
TOKEN_BYTES = HEADS * HEAD_DIM * 2 * 2
FP = "5e1ec7ed" * 4


def log(msg: str) -> None:
    print(f"store_bench: {msg}", file=sys.stderr, flush=True)


def clustered_selection(n: int, fraction: float, rng: random.Random) -> list[int]:
    """About fraction*n group ids in runs (geometric lengths, mean 4), like top-k attention picks."""
    chosen: set[int] = set()
    while len(chosen) < fraction * n:
        start, length = rng.randrange(n), 1
        while rng.random() < 0.75:
            length += 1
        chosen.update(range(start, min(n, start + length)))
    return sorted(chosen)


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive ids."""
    out: list[tuple[int, int]] = []
    for g in ids:
        if out and g == out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((g, 1))
    return out


def raw_write_mb_s(folder: Path, files: int, file_bytes: int) -> float:
    """The same files written raw: each file's bytes from memory, O_DIRECT 1 MiB writes, fsync."""
    size = fileio_align_up(file_bytes)
    buf = aligned_buffer(size)
    buf.write(os.urandom(1 << 20) * (size >> 20) + os.urandom(size % (1 << 20)))
    view = memoryview(buf)
    t0 = time.perf_counter()
    for i in range(files):
        path = folder / f"raw-write-{i}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        for off in range(0, size, 1 << 20):
            os.pwritev(fd, [view[off:min(size, off + (1 << 20))]], off)
        os.fsync(fd)
        os.close(fd)
    dt = time.perf_counter() - t0
    for i in range(files):
        (folder / f"raw-write-{i}.bin").unlink()
    return files * file_bytes / dt / 1e6


def store_config(root: Path, group_kib: int, qd: int, **kw) -> StoreConfig:
    return StoreConfig(root=root, model_fingerprint=FP, num_layers=1024, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                       group_size=group_kib * 1024 // TOKEN_BYTES, dtype=DTYPE, io_threads=qd, **kw)


def write_dataset(store: DiskStore, files: int, groups_per_file: int, sequence: str = "bench") -> tuple[float, int]:
    """Write `files` layers of one sequence (prefill-style, one big file each); (MB/s, bytes)."""
    cfg = store.config
    # Page-aligned, as the runtime's group buffers are: the kv bytes go to disk without a copy.
    src = aligned_tensor((groups_per_file, *cfg.group_shape), cfg.torch_dtype)
    src.copy_(torch.randn(src.shape))
    store.open_sequence(sequence, private=False)
    t0 = time.perf_counter()
    # As a prefill does: layer L+1 is checksummed and serialised while layer L is written.
    futures = [store.write_groups_async(sequence, layer, 0, src) for layer in range(files)]
    if not all(f.result() for f in futures):
        raise RuntimeError("benchmark write refused (capacity or disk full)")
    dt = time.perf_counter() - t0
    nbytes = files * groups_per_file * cfg.group_bytes
    return nbytes / dt / 1e6, nbytes


def bench_writes(store: DiskStore, files: int, groups_per_file: int, rounds: int) -> tuple[float, float, float, int]:
    """Store and raw writes of the same files, side by side over `rounds` (which goes first
    alternates, so drift cancels); (store MB/s, raw MB/s, median per-round ratio, bytes).
    The median of per-round ratios is what we report: this VM's disk throughput swings by
    +-20% from one second to the next, and a ratio taken within a round sees the same swing on
    both sides. Round 0 leaves the dataset the reads use."""
    t_store = t_raw = 0.0
    ratios: list[float] = []
    nbytes = 0
    for r in range(rounds):
        seq = "bench" if r == 0 else f"w{r}"
        raw_first = r % 2 == 1
        raw_mb_s = raw_write_mb_s(store.config.namespace, files, groups_per_file * store.config.group_bytes) \
            if raw_first else 0.0
        mb_s, nbytes = write_dataset(store, files, groups_per_file, seq)
        if not raw_first:
            raw_mb_s = raw_write_mb_s(store.config.namespace, files, nbytes // files)
        t_store += nbytes / mb_s
        t_raw += nbytes / raw_mb_s
        ratios.append(mb_s / raw_mb_s)
        if r:
            store.release_sequence(seq)
            store.delete_sequence(seq)
    return nbytes * rounds / t_store, nbytes * rounds / t_raw, statistics.median(ratios), nbytes


def bench_group_size(root: Path, group_kib: int, data_mb: int, fraction: float, qd: int, passes: int,
                     rng: random.Random) -> dict:
    cfg = store_config(root, group_kib, qd)
    files = 16
    groups_per_file = max(64, data_mb * 2**20 // files // cfg.group_bytes)
    with DiskStore(cfg) as store:
        write_mb_s, raw_w, write_ratio, nbytes = bench_writes(store, files, groups_per_file, rounds=10)
    # A second store over the same files issues one read per group.
    with DiskStore(cfg) as store, DiskStore(store_config(root, group_kib, qd, coalesce_reads=False)) as single:
        store.open_sequence("bench", private=False)
        infos = {layer: open_segment(p, cfg) for layer, p in
                 ((int(p.name[1:4]), p) for p in sorted((cfg.namespace / "bench").glob("*.arrow")))}
        single.open_sequence("bench", private=False)
        t = {"raw_coalesced": 0.0, "store_coalesced": 0.0, "raw_per_group": 0.0, "store_per_group": 0.0}
        b = dict.fromkeys(t, 0)
        extents_total = extents_bytes = 0
        for _ in range(passes):
            for layer, info in infos.items():
                sel = clustered_selection(groups_per_file, fraction, rng)
                coalesced = [(info.data_offset + f * info.row_bytes, c * info.row_bytes) for f, c in runs(sel)]
                single_ext = [(info.data_offset + g * info.row_bytes, info.row_bytes) for g in sel]
                extents_total += len(coalesced)
                extents_bytes += sum(c for _, c in coalesced)
                out = aligned_tensor((len(sel), *cfg.group_shape), cfg.torch_dtype)
                # Alternate the four readers so drift in the machine hits them alike.
                for name, fn in (
                    ("raw_coalesced", lambda: read_extents(info.path, coalesced, qd)),
                    ("store_coalesced", lambda: _timed_store(store, layer, sel, out)),
                    ("raw_per_group", lambda: read_extents(info.path, single_ext, qd)),
                    ("store_per_group", lambda: _timed_store(single, layer, sel, out)),
                ):
                    nb, dt = fn()
                    b[name] += nb
                    t[name] += dt
        row = {f"{k}_mb_s": round(b[k] / t[k] / 1e6, 1) for k in t}
        assert store.stats.checksum_failures == 0 and store.stats.groups_missing == 0
    shutil.rmtree(cfg.namespace, ignore_errors=True)
    row.update(
        group_kib=group_kib, group_tokens=cfg.group_size, data_mb=round(nbytes / 2**20),
        mean_extent_kib=round(extents_bytes / extents_total / 1024, 1),
        read_ratio_vs_raw=round(row["store_coalesced_mb_s"] / row["raw_coalesced_mb_s"], 3),
        per_group_read_ratio_vs_raw=round(row["store_per_group_mb_s"] / row["raw_per_group_mb_s"], 3),
        coalescing_speedup=round(row["store_coalesced_mb_s"] / row["store_per_group_mb_s"], 2),
        write_store_mb_s=round(write_mb_s, 1), write_raw_mb_s=round(raw_w, 1),
        write_ratio_vs_raw=round(write_ratio, 3),
    )
    log(json.dumps(row))
    return row


def _timed_store(store: DiskStore, layer: int, sel: list[int], out: torch.Tensor) -> tuple[int, float]:
    t0 = time.perf_counter()
    r: ReadResult = store.read_groups("bench", layer, sel, out=out)
    return r.bytes_read, time.perf_counter() - t0


def bench_memory(root: Path, group_kib: int, read_gb: float, fraction: float, qd: int, rng: random.Random,
                 encryption_key: bytes | None = None) -> dict:
    """Read `read_gb` GB of groups; RSS and page-cache growth of the block files over the run."""
    cfg = store_config(root, group_kib, qd, encryption_key=encryption_key)
    files, per_file = 16, 64 * 2**20 // cfg.group_bytes
    proc = psutil.Process()
    with DiskStore(cfg) as store:
        write_mb_s, _ = write_dataset(store, files, per_file)
        paths = sorted((cfg.namespace / "bench").glob("*.arrow"))
        cache0 = sum(resident_bytes(p) for p in paths)
        out = aligned_tensor((per_file, *cfg.group_shape), cfg.torch_dtype)
        rss0 = peak = proc.memory_info().rss
        target, t0 = read_gb * 1e9, time.perf_counter()
        while store.stats.bytes_read < target:
            for layer in range(files):
                sel = clustered_selection(per_file, fraction, rng)
                store.read_groups("bench", layer, sel, out=out[: len(sel)])
                peak = max(peak, proc.memory_info().rss)
        dt = time.perf_counter() - t0
        cache1 = sum(resident_bytes(p) for p in paths)
        stats = store.stats.as_dict()
    shutil.rmtree(cfg.namespace, ignore_errors=True)
    return {
        "group_kib": group_kib, "encrypted": encryption_key is not None,
        "bytes_read_gb": round(stats["bytes_read"] / 1e9, 2), "read_mb_s": round(stats["bytes_read"] / dt / 1e6, 1),
        "write_mb_s": round(write_mb_s, 1),
        "page_cache_growth_mb": round((cache1 - cache0) / 2**20, 2), "rss_growth_mb": round((peak - rss0) / 2**20, 1),
        "checksum_failures": stats["checksum_failures"], "direct_io": stats["direct_io"],
    }


def bench_profiles(root: Path, group_kib: int, qd: int, rng: random.Random) -> list[dict]:
    """Store reads through each profile's throttle: the emulated device's MB/s."""
    rows = []
    cfg = store_config(root, group_kib, qd)
    per_file = 16 * 2**20 // cfg.group_bytes
    with DiskStore(cfg) as store:
        write_dataset(store, 1, per_file)
    for name, prof in PROFILES.items():
        with DiskStore(cfg, throttle=prof.throttle()) as store:
            store.open_sequence("bench", private=False)
            sel = clustered_selection(per_file, 0.25, rng)
            t0 = time.perf_counter()
            r = store.read_groups("bench", 0, sel)
            dt = time.perf_counter() - t0
        rows.append({"profile": name, "nominal_mb_s": prof.read_mb_s, "emulated_mb_s": round(r.bytes_read / dt / 1e6, 1),
                     "suggested_group_tokens_smollm2": prof.group_size(3 * 64 * 2 * 4)})
        log(json.dumps(rows[-1]))
    shutil.rmtree(cfg.namespace, ignore_errors=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (key, label) in enumerate([("raw_coalesced_mb_s", "raw O_DIRECT, coalesced extents"),
                                      ("store_coalesced_mb_s", "DiskStore, coalesced"),
                                      ("raw_per_group_mb_s", "raw O_DIRECT, one read per group"),
                                      ("store_per_group_mb_s", "DiskStore, one read per group")]):
        ax.bar(x + (i - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=label)
    ax.set_xticks(x, [f"{r['group_kib']} KiB" for r in rows])
    ax.set_xlabel("group size")
    ax.set_ylabel("MB/s (25% clustered selection)")
    ax.set_title(f"Disk tier reads vs raw device, QD {result['config']['queue_depth']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON output (a PNG is written beside it)")
    p.add_argument("--dir", type=Path, default=None, help="folder on the device to test (default: a temp folder under ~/.cache/kvswap)")
    p.add_argument("--group-kib", default="4,16,64,256", help="group sizes in KiB (default: 4,16,64,256)")
    p.add_argument("--data-mb", type=int, default=256, help="data written per group size (default: 256)")
    p.add_argument("--passes", type=int, default=2, help="selection passes over the data per group size")
    p.add_argument("--fraction", type=float, default=0.25, help="share of groups selected (default: 0.25)")
    p.add_argument("--queue-depth", type=int, default=8, help="reads in flight (default: 8)")
    p.add_argument("--read-gb", type=float, default=2.0, help="GB read for the memory measurement (default: 2)")
    args = p.parse_args(argv)
    base = args.dir or (Path.home() / ".cache" / "kvswap")
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="store-bench-", dir=base))
    os.chmod(root, 0o700)
    rng = random.Random(0)
    try:
        rows = []
        for kib in [int(k) for k in args.group_kib.split(",")]:
            log(f"group size {kib} KiB ...")
            rows.append(bench_group_size(root, kib, args.data_mb, args.fraction, args.queue_depth, args.passes, rng))
        log(f"memory while reading {args.read_gb} GB ...")
        memory = bench_memory(root, 64, args.read_gb, args.fraction, args.queue_depth, rng)
        log(json.dumps(memory))
        log("encryption cost ...")
        encrypted = bench_memory(root, 64, min(0.5, args.read_gb), args.fraction, args.queue_depth, rng,
                                 encryption_key=os.urandom(32))
        plain_small = bench_memory(root, 64, min(0.5, args.read_gb), args.fraction, args.queue_depth, rng)
        log("storage profile emulation ...")
        profiles = bench_profiles(root, 64, args.queue_depth, rng)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "store_bench",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "dir": str(base)},
        "config": {"token_bytes": TOKEN_BYTES, "dtype": DTYPE, "fraction": args.fraction,
                   "queue_depth": args.queue_depth, "data_mb_per_size": args.data_mb, "passes": args.passes},
        "direct_io": memory["direct_io"],
        # Goals: >= 0.8 each (worst group size), < 64 MB together.
        "read_ratio_vs_raw": min(r["read_ratio_vs_raw"] for r in rows),
        "write_ratio_vs_raw": min(r["write_ratio_vs_raw"] for r in rows),
        "page_cache_growth_mb": memory["page_cache_growth_mb"],
        "rss_growth_mb": memory["rss_growth_mb"],
        "rows": rows,
        "memory": memory,
        "encryption": {"plain": plain_small, "aes_gcm": encrypted,
                       "read_cost_ratio": round(encrypted["read_mb_s"] / plain_small["read_mb_s"], 3),
                       "write_cost_ratio": round(encrypted["write_mb_s"] / plain_small["write_mb_s"], 3)},
        "profiles": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    print(json.dumps({k: result[k] for k in ("read_ratio_vs_raw", "write_ratio_vs_raw", "page_cache_growth_mb",
                                            "rss_growth_mb", "direct_io")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
