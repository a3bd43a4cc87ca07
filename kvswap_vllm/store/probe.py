"""Measure the real storage device: O_DIRECT random reads over request sizes and queue depths."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from kvswap_vllm.store import fileio
from kvswap_vllm.store.profiles import StorageProfile

REQUEST_SIZES = (4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20)
QUEUE_DEPTHS = (1, 2, 4, 8, 16, 32)


def read_extents(path: Path, extents: Sequence[tuple[int, int]], queue_depth: int, direct: bool = True) -> tuple[int, float]:
    """Raw reads of (offset, length) extents with `queue_depth` threads; (bytes, seconds)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    size = os.fstat(fd).st_size

    def one(ext: tuple[int, int]) -> int:
        start = fileio.align_down(ext[0])
        end = min(fileio.align_up(ext[0] + ext[1]), fileio.align_up(size))
        buf = fileio.aligned_buffer(end - start)
        return os.preadv(fd, [memoryview(buf)[: end - start]], start)

    try:
        with ThreadPoolExecutor(queue_depth) as pool:
            t0 = time.perf_counter()
            total = sum(pool.map(one, extents))
            return total, time.perf_counter() - t0
    finally:
        os.close(fd)


def make_probe_file(path: Path, size: int) -> None:
    """A file of random bytes written with O_DIRECT, so none of it sits in the page cache."""
    chunk = fileio.aligned_buffer(1 << 20)
    chunk.write(os.urandom(1 << 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, fileio.FILE_MODE)
    try:
        for off in range(0, size, 1 << 20):
            os.pwritev(fd, [chunk], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def probe(folder: Path, size_mb: int = 256, seconds_per_cell: float = 0.25,
          sizes: Sequence[int] = REQUEST_SIZES, depths: Sequence[int] = QUEUE_DEPTHS) -> tuple[StorageProfile, list[dict]]:
    """Measure MB/s for each (request size, queue depth); derive a profile from the matrix."""
    fileio.check_private_dir(folder, create=True)
    path = folder / f".kvswap-probe-{os.getpid()}"
    size = size_mb << 20
    rows: list[dict] = []
    try:
        make_probe_file(path, size)
        rng = random.Random(0)
        for req in sizes:
            for qd in depths:
                n = 0
                total, elapsed = 0, 0.0
                while elapsed < seconds_per_cell:
                    batch = [(rng.randrange(0, size // req) * req, req) for _ in range(max(qd * 4, 16))]
                    b, t = read_extents(path, batch, qd)
                    total, elapsed, n = total + b, elapsed + t, n + len(batch)
                rows.append({"request_bytes": req, "queue_depth": qd, "mb_s": total / elapsed / 1e6,
                             "latency_us": elapsed / n * qd * 1e6})
                print(f"kvswap: probe {req >> 10:>5} KiB x QD{qd:<2} {rows[-1]['mb_s']:8.1f} MB/s",
                      file=sys.stderr, flush=True)
    finally:
        path.unlink(missing_ok=True)
    return profile_from_matrix(rows, name=f"probed:{folder}"), rows


def profile_from_matrix(rows: list[dict], name: str) -> StorageProfile:
    peak = max(r["mb_s"] for r in rows)
    best = min((r for r in rows if r["mb_s"] >= 0.8 * peak), key=lambda r: (r["request_bytes"], r["queue_depth"]))
    qd = min(r["queue_depth"] for r in rows if r["request_bytes"] == best["request_bytes"]
             and r["mb_s"] >= 0.9 * max(x["mb_s"] for x in rows if x["request_bytes"] == best["request_bytes"]))
    small = min(rows, key=lambda r: (r["request_bytes"], r["queue_depth"]))
    return StorageProfile(name=name, read_mb_s=round(peak, 1), latency_us=round(small["latency_us"], 1),
                          best_request_bytes=best["request_bytes"], queue_depth=qd)


_libc = ctypes.CDLL(None, use_errno=True)


def resident_bytes(path: Path) -> int:
    """Bytes of `path` held in the page cache right now (mincore over a read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(mm)  # a pointer to the mapping; touches no page
    try:
        if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    finally:
        del anchor
        mm.close()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE
