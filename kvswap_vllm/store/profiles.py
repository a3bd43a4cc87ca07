"""Storage profiles: what a class of device does well, and the group/read sizes that suit it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kvswap_vllm.store.errors import StoreError
from kvswap_vllm.store.throttle import Throttle


@dataclass(frozen=True)
class StorageProfile:
    """Read behaviour of a storage device."""

    name: str
    # Sequential/large-request read bandwidth, MB/s.
    read_mb_s: float
    # Latency of one small random read, microseconds.
    latency_us: float
    # Smallest request size that reaches most of the bandwidth, bytes.
    best_request_bytes: int
    # Requests worth keeping in flight.
    queue_depth: int

    def group_size(self, bytes_per_token: int, budget_tokens: int = 400) -> int:
        """Tokens per group: the smallest power of two whose group reaches the best request
        size, capped so that a budget of `budget_tokens` still has >= 32 groups to choose from."""
        g = 1
        while g * bytes_per_token < self.best_request_bytes and g * 2 <= max(1, budget_tokens // 32):
            g *= 2
        return g

    def store_settings(self) -> dict[str, int]:
        """StoreConfig fields this device wants: reads in flight, the largest single read, and the
        gap worth reading through: what the device transfers in one request's latency (reading
        it costs less than another request), at most one best-sized request."""
        return {
            "io_threads": max(1, min(self.queue_depth, 16)),
            "max_read_bytes": max(256 << 10, min(4 * self.best_request_bytes, 2 << 20)),
            "read_gap_bytes": int(min(self.latency_us * self.read_mb_s, self.best_request_bytes)),
        }

    def throttle(self) -> Throttle:
        """A throttle that makes a faster disk behave like this profile."""
        return Throttle(self.read_mb_s * 1e6, self.latency_us * 1e-6)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


# Typical figures for each class (datasheets and published measurements of phone/board storage);
# `kvswap store probe` measures the real device instead.
PROFILES: dict[str, StorageProfile] = {
    "nvme": StorageProfile("nvme", read_mb_s=2000.0, latency_us=80.0, best_request_bytes=64 << 10, queue_depth=32),
    "ufs": StorageProfile("ufs", read_mb_s=1000.0, latency_us=150.0, best_request_bytes=64 << 10, queue_depth=16),
    "emmc": StorageProfile("emmc", read_mb_s=250.0, latency_us=400.0, best_request_bytes=128 << 10, queue_depth=4),
    "sd": StorageProfile("sd", read_mb_s=80.0, latency_us=1500.0, best_request_bytes=256 << 10, queue_depth=2),
}


def get_profile(name_or_path: str) -> StorageProfile:
    """A built-in profile by name, or one written by `kvswap store probe` (a JSON file)."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json":
        try:
            return StorageProfile(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"cannot read storage profile {path}: {exc}") from exc
    raise StoreError(f"unknown storage profile {name_or_path!r}; supported: {', '.join(PROFILES)} or a probe .json file")
