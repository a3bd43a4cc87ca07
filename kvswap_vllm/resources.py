"""Honest cost accounting of a run: peak RSS and disk bytes of the whole process tree.

vLLM runs its engine and worker in child processes, so the meter samples every descendant
with psutil in a background thread and remembers the last counters of processes that exit.
Disk bytes are the kernel's `read_bytes`/`write_bytes` (storage I/O; page-cache hits are free).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

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
        self.usage = ResourceUsage(self._peak_rss, read, write, len(self._io_last))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self, baseline: bool = False) -> None:
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    io = proc.io_counters()
            except (psutil.Error, AttributeError):
                continue
            counters = (io.read_bytes, io.write_bytes)
            # Processes alive at the start count from their current counters; one that appears
            # mid-run counts from zero: all its I/O belongs to this run.
            self._io_start.setdefault(proc.pid, counters if baseline else (0, 0))
            self._io_last[proc.pid] = counters
        self._peak_rss = max(self._peak_rss, rss)
