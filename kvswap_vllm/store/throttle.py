"""Makes this machine's disk behave like a slower device, for benchmarks."""

from __future__ import annotations

import threading
import time


class Throttle:
    """Shared bandwidth (bytes/s) plus a fixed latency per request; requests in flight overlap
    their latency, as on a device with a queue, but share the bandwidth."""

    def __init__(self, bandwidth_bytes_s: float, latency_s: float) -> None:
        if bandwidth_bytes_s <= 0 or latency_s < 0:
            raise ValueError("bandwidth must be > 0 and latency >= 0")
        self.bandwidth = bandwidth_bytes_s
        self.latency = latency_s
        self._lock = threading.Lock()
        self._busy_until = 0.0

    def wait(self, nbytes: int) -> None:
        """Block the calling thread as long as the emulated device would take for `nbytes`."""
        with self._lock:
            now = time.perf_counter()
            done = max(now, self._busy_until) + nbytes / self.bandwidth
            self._busy_until = done
        time.sleep(max(0.0, done - now) + self.latency)
