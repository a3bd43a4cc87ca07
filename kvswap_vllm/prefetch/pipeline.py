"""Submit layer L+1's loads while layer L computes; each layer waits only for its own."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvswap_vllm.hot.tier import HotTier, LoadResult


@dataclass
class PrefetchStats:
    """Per layer: seconds spent loading, and seconds the layer waited for its load."""

    load_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    ahead: int = 0
    synchronous: int = 0

    @property
    def overlap(self) -> float:
        """Share of load time hidden behind compute (1.0 = reads never made a layer wait)."""
        load = sum(self.load_s)
        return 1.0 - min(1.0, sum(self.wait_s) / load) if load else 1.0


class LayerPrefetcher:
    """One background thread runs loads in submission order (layer by layer)."""

    def __init__(self, hot: HotTier) -> None:
        self.hot = hot
        n = hot.store.config.num_layers
        self.stats = PrefetchStats(load_s=[0.0] * n, wait_s=[0.0] * n)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvswap-prefetch")
        self._pending: dict[int, Future[LoadResult]] = {}

    def submit(self, layer: int, groups: torch.Tensor, ahead: bool = True) -> None:
        """Start loading `groups` of `layer` (replacing a load not yet waited for); `ahead`
        says whether the load was issued a layer early (else it is on the critical path)."""
        if ahead:
            self.stats.ahead += 1
        else:
            self.stats.synchronous += 1
        self._pending[layer] = self._pool.submit(self._load, layer, groups)

    def _load(self, layer: int, groups: torch.Tensor) -> LoadResult:
        t0 = time.perf_counter()
        with torch.inference_mode():  # per thread; the slots may be inference tensors
            res = self.hot.load(layer, groups)
        self.stats.load_s[layer] += time.perf_counter() - t0
        return res

    def wait(self, layer: int, groups: torch.Tensor | None = None) -> LoadResult:
        """The layer's load result; loads synchronously when nothing was submitted for it."""
        fut = self._pending.pop(layer, None)
        t0 = time.perf_counter()
        if fut is None:
            if groups is None:
                raise ValueError(f"layer {layer}: nothing prefetched and no groups given")
            self.stats.synchronous += 1
            # Through the same thread: loads share the hot tier's staging buffer.
            res = self._pool.submit(self._load, layer, groups).result()
        else:
            res = fut.result()
        self.stats.wait_s[layer] += time.perf_counter() - t0
        return res

    def close(self) -> None:
        self._pool.shutdown(wait=True)
