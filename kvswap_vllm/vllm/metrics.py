"""The connector's counters, carried through vLLM's stats path to its log line and Prometheus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics, KVConnectorStats, PromMetric, PromMetricT,
)

# Counter name -> Prometheus help text. Every value is a count or a sum over an interval.
COUNTERS: dict[str, str] = {
    "blocks_queried": "Prompt blocks looked up in the KVSwap disk tier.",
    "blocks_hit": "Prompt blocks found in the KVSwap disk tier (loaded instead of recomputed).",
    "blocks_loaded": "Blocks loaded from the KVSwap disk tier into vLLM's KV cache.",
    "bytes_loaded": "Bytes loaded from the KVSwap disk tier.",
    "load_errors": "Blocks that could not be loaded (missing, corrupt, unreadable) and were recomputed.",
    "load_seconds": "Time spent waiting for KVSwap loads, in seconds.",
    "blocks_saved": "Blocks written to the KVSwap disk tier.",
    "bytes_saved": "Bytes written to the KVSwap disk tier.",
    "save_errors": "Blocks whose write to the KVSwap disk tier failed or was refused (full disk, capacity).",
    "saves_skipped": "Blocks not saved because too many writes were already queued.",
}


@dataclass
class KVSwapStats(KVConnectorStats):
    """Counters of one interval; sums when aggregated across workers and steps."""

    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = {name: 0 for name in COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> "KVSwapStats":
        for name in COUNTERS:
            self.data[name] += other.data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: round(v, 4) if isinstance(v, float) else v for k, v in self.data.items()}
        queried = self.data["blocks_queried"]
        out["hit_rate"] = round(self.data["blocks_hit"] / queried, 4) if queried else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVSwapPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per entry of COUNTERS, named vllm:kvswap_<name>_total."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(name=f"vllm:kvswap_{name}", documentation=doc, labelnames=labelnames)
            for name, doc in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, counter in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                counter.labels(*labels).inc(value)
