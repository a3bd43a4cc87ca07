"""Honest cost accounting of a run: peak RSS and disk bytes of the whole process tree.

vLLM runs its engine and worker in child processes, so the meter samples every descendant
with psutil in a background thread and remembers the last counters of processes that exit.
A sample every 0.2 s misses short peaks (a prefill layer's transients last ~0.1 s), so each
sample also reads each process's own peak from the kernel (VmHWM, which `reset_peak` restarts
through /proc/PID/clear_refs); the peak is the larger of the summed samples and the sum of the
processes' kernel peaks (an upper bound when several processes peak at different times).
Disk bytes are the kernel's `read_bytes`/`write_bytes` (storage I/O; page-cache hits are free).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class ResourceUsage:
    """What a run cost, summed over the process tree."""

    peak_rss_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    # Processes seen over the run (this one and its descendants).
    num_processes: int


def tree_rss_bytes(root: psutil.Process | None = None) -> int:
    """RSS of a process and all its descendants, now."""
    root = root or psutil.Process()
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class ResourceMeter:
    """Context manager that samples the process tree every `interval_s` seconds."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self._interval_s = interval_s
        self._root = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvswap-meter", daemon=True)
        self._peak_rss = 0
        self._hwm: dict[int, int] = {}  # pid -> its kernel peak RSS (VmHWM), bytes
        self._hwm_valid = True  # False once a reset could not restart a process's VmHWM
        self._io_start: dict[int, tuple[int, int]] = {}
        self._io_last: dict[int, tuple[int, int]] = {}
        self.usage: ResourceUsage | None = None

    def __enter__(self) -> "ResourceMeter":
        self._sample(baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        read = sum(last[0] - self._io_start[pid][0] for pid, last in self._io_last.items())
        write = sum(last[1] - self._io_start[pid][1] for pid, last in self._io_last.items())
        peak = max(self._peak_rss, sum(self._hwm.values()) if self._hwm_valid else 0)
        self.usage = ResourceUsage(peak, read, write, len(self._io_last))

    def reset_peak(self) -> None:
        """Count the peak from now on (e.g. once the engine is loaded and idle)."""
        self._hwm.clear()
        for proc in _tree(self._root):
            try:
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # 5: reset VmHWM to VmRSS
            except OSError:
                self._hwm_valid = False
        self._peak_rss = 0
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self, baseline: bool = False) -> None:
        procs = _tree(self._root)
        if not procs:
            return
        rss = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    io = proc.io_counters()
            except (psutil.Error, AttributeError):
                continue
            hwm = _kernel_peak_rss(proc.pid)
            if hwm is not None:
                self._hwm[proc.pid] = hwm
            counters = (io.read_bytes, io.write_bytes)
            # Processes alive at the start count from their current counters; one that appears
            # mid-run counts from zero: all its I/O belongs to this run.
            self._io_start.setdefault(proc.pid, counters if baseline else (0, 0))
            self._io_last[proc.pid] = counters
        self._peak_rss = max(self._peak_rss, rss)


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _kernel_peak_rss(pid: int) -> int | None:
    """The process's peak RSS since it started or its VmHWM was reset, bytes (None: unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():  # noqa: ANN202
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory_promptly(mmap_threshold: int = 1 << 20) -> bool:
    """Make freed memory go back to the OS (glibc). By default glibc raises its mmap threshold
    after each large free (up to 32 MiB), so a prefill's large transient tensors then come from
    the heap, which seldom shrinks: a long-running server keeps every past peak as RSS. A fixed
    threshold gives allocations of `mmap_threshold` bytes and more their own mappings, unmapped
    when freed. 1 MiB: prefill transients (a 1024-token chunk's hidden states, queries, MLP
    slices, blocks of the past read back: 1.5-10 MB each) are mapped; decode-size tensors
    (hundreds of KiB, per layer and request) stay in the heap, since mapping each costs page
    faults (measured: a 320 KB torch.cat took 128 us with a 256 KiB threshold, 14 us without).
    Measured on the HF runtime, one 7k-token prompt (kernel peak RSS over the warm engine):
    prefill peak 53-81 MB with 4 MiB (freed 1.5-4 MB blocks fragment the heap) against 50-53 MB
    with 1 MiB, for ~10% more prefill time (the page faults). False where this is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20))


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (after requests end)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def helper_thread_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool for KVSwap's helper threads (reads, writes, prefetch, selection), whose tensor ops
    run on one thread: every thread that runs a parallel op otherwise starts an OpenMP team of
    its own, as wide as the machine, whose threads then wait (spinning at first) on the cores
    the forward pass computes on. torch's thread count is per thread: the forward pass keeps
    its own. The threads may run on any CPU of the machine (see `_any_cpu`)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=_helper_thread)


def _helper_thread() -> None:
    import torch

    # torch.set_num_threads itself: vLLM's CPU worker replaces it with a no-op once it has
    # bound its OpenMP threads (it would move them), but this thread's count is its own.
    torch._C.set_num_threads(1)
    _any_cpu()


def _any_cpu() -> None:
    """Let the calling thread run on every CPU the process may use. vLLM's CPU worker pins its
    process to the cores of its OpenMP threads (on a 2-core machine, one core: the other is left
    to the engine process, idle while a forward pass runs), and threads inherit that pin; a
    helper thread pinned there would take its time from the forward pass."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))  # the kernel keeps what the cgroup allows
    except (AttributeError, OSError):
        pass
