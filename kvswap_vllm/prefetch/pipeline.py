"""Submit a layer's loads before it runs; each layer waits only for its own.

Three mechanisms submit loads, named in the stats:
- `step`: at the start of a decode step, every layer >= 2 re-selects with the query it used
  last (the previous step's, or the last prompt token's), so reads start before the forward
  pass reaches the layer;
- `ahead`: inside the pass, layer L predicts layer L+1's query (layer-ahead) and submits its
  selection, which the layer attends to (or, with reselect, which prefetches most of it);
- `own`: a layer with no final submission selects from its own query, on the critical path;
- `exact`: a layer whose selection was predicted selects again from its own query (reselect)
  and reads what the prediction missed, on the critical path.
A later submission for a layer supersedes an earlier one; loads of the hot tier only read the
groups not already resident, so a superseded load's reads still serve the later selection when
they overlap. A group read counts as useful when the selection the layer attends to holds it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from kvswap_vllm.hot.tier import HotTier, LoadResult, PendingLoad
from kvswap_vllm.resources import helper_thread_pool

SOURCES = ("step", "ahead", "own", "exact")


@dataclass
class SourceStats:
    """What one mechanism's loads did."""

    loads: int = 0
    groups_read: int = 0
    bytes_read: int = 0
    # Groups read that the layer then attended to.
    groups_useful: int = 0

    def as_dict(self) -> dict:
        return {"loads": self.loads, "groups_read": self.groups_read, "bytes_read": self.bytes_read,
                "groups_useful": self.groups_useful}


@dataclass
class PrefetchStats:
    """Per layer: seconds spent loading, and seconds the layer waited for its load."""

    load_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    by_source: dict[str, SourceStats] = field(default_factory=lambda: {s: SourceStats() for s in SOURCES})

    @property
    def ahead(self) -> int:
        """Final selections that were submitted before the layer ran (layer-ahead)."""
        return self.by_source["ahead"].loads

    @property
    def synchronous(self) -> int:
        """Final selections made from the layer's own query, on the critical path."""
        return self.by_source["own"].loads + self.by_source["exact"].loads

    @property
    def overlap(self) -> float:
        """Share of load time hidden behind compute (1.0 = reads never made a layer wait)."""
        load = sum(self.load_s)
        return 1.0 - min(1.0, sum(self.wait_s) / load) if load else 1.0

    def as_dict(self) -> dict:
        return {"overlap": self.overlap, "load_s": sum(self.load_s), "wait_s": sum(self.wait_s),
                "by_source": {s: v.as_dict() for s, v in self.by_source.items()}}


class LayerPrefetcher:
    """One background thread runs loads in submission order (they share the hot tier's
    staging buffer); `load_now` runs them in the calling thread, several sequences at once."""

    def __init__(self, hot: HotTier) -> None:
        self.hot = hot
        n = hot.store.config.num_layers
        self.stats = PrefetchStats(load_s=[0.0] * n, wait_s=[0.0] * n)
        self._pool = helper_thread_pool(1, "kvswap-prefetch")
        self._pending: dict[int, Future[LoadResult] | _Done] = {}
        self._pending_groups: dict[int, torch.Tensor] = {}
        self._last: Future[LoadResult] | None = None  # the newest background load
        # Per layer, since its last wait: (source, groups read) of each finished load.
        self._reads: list[list[tuple[str, list[int]]]] = [[] for _ in range(n)]

    def submit(self, layer: int, groups: torch.Tensor, source: str) -> None:
        """Start loading `groups` of `layer` in the background; supersedes a load not yet waited
        for. The same groups as the pending load (a prediction that was right) need no second load."""
        if self._counts(layer, groups, source):
            self._pending_groups[layer] = groups
            self._pending[layer] = self._last = self._pool.submit(self._load, layer, groups, source)

    @staticmethod
    def load_now(prefetchers: list["LayerPrefetcher"], layer: int, groups: list[torch.Tensor],
                 sources: list[str]) -> None:
        """Load `groups[i]` of `layer` for prefetchers[i] now, in the calling thread, all in one
        store call (their hot tiers share a store): for a selection the layer attends to right
        away, where a background thread would only add a hand-off per sequence and, on a small
        CPU, take the GIL from the forward pass. Each prefetcher's earlier loads finish first
        (they share its staging buffer); `wait(layer)` then returns at once."""
        LayerPrefetcher.start_now(prefetchers, layer, groups, sources).finish()

    @staticmethod
    def start_now(prefetchers: list["LayerPrefetcher"], layer: int, groups: list[torch.Tensor],
                  sources: list[str]) -> "OwnLoads":
        """`load_now`, started: its reads are in flight (with kernel AIO) while the caller goes on;
        `finish()` of the result, in the same thread, before the layer waits for them."""
        todo = [(p, g, src) for p, g, src in zip(prefetchers, groups, sources) if p._counts(layer, g, src)]
        for p, _, _ in todo:
            if p._last is not None:
                p._last.exception()  # waits; a failed load raises where its layer waits for it
        t0 = time.perf_counter()
        with torch.inference_mode():  # the slots may be inference tensors
            pending = HotTier.start_many([p.hot for p, _, _ in todo], layer, [g for _, g, _ in todo]) if todo else None
        return OwnLoads(todo, layer, pending, t0, time.perf_counter() - t0)

    def _counts(self, layer: int, groups: torch.Tensor, source: str) -> bool:
        """Whether a load of `groups` is needed (counted as one of `source`), or the pending one is it."""
        if source not in SOURCES:
            raise ValueError(f"unknown load source {source!r}; one of {SOURCES}")
        same = self._pending_groups.get(layer)
        if layer in self._pending and same is not None and torch.equal(same, groups):
            return False
        self.stats.by_source[source].loads += 1
        return True

    def pending(self, layer: int) -> bool:
        return layer in self._pending

    def _load(self, layer: int, groups: torch.Tensor, source: str) -> LoadResult:
        t0 = time.perf_counter()
        with torch.inference_mode():  # per thread; the slots may be inference tensors
            res = self.hot.load(layer, groups)
        self._record(layer, source, res, time.perf_counter() - t0)
        return res

    def _record(self, layer: int, source: str, res: LoadResult, seconds: float) -> None:
        self.stats.load_s[layer] += seconds
        s = self.stats.by_source[source]
        s.groups_read += len(res.read)
        s.bytes_read += res.bytes_read
        self._reads[layer].append((source, res.read))

    def wait(self, layer: int) -> LoadResult:
        """The result of the layer's last submitted load; earlier loads finished before it."""
        fut = self._pending.pop(layer, None)
        self._pending_groups.pop(layer, None)
        if fut is None:
            raise ValueError(f"layer {layer}: no load submitted")
        t0 = time.perf_counter()
        res = fut.result()
        self.stats.wait_s[layer] += time.perf_counter() - t0
        attended = set(res.groups)
        for source, read in self._reads[layer]:
            self.stats.by_source[source].groups_useful += sum(1 for g in read if g in attended)
        self._reads[layer].clear()
        return res

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class OwnLoads:
    """Loads started by LayerPrefetcher.start_now."""

    def __init__(self, todo: list[tuple[LayerPrefetcher, torch.Tensor, str]], layer: int,
                 pending: PendingLoad | None, started: float, blocked_s: float) -> None:
        self.todo, self.layer, self.pending, self.started, self.blocked_s = todo, layer, pending, started, blocked_s

    def finish(self) -> None:
        """Wait for the reads and fill the slots; each layer's `wait` then returns at once. Once:
        a second call does nothing."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        t0 = time.perf_counter()
        with torch.inference_mode():
            results = pending.finish()
        end = time.perf_counter()
        for (p, g, src), res in zip(self.todo, results):
            p._record(self.layer, src, res, end - self.started)
            p.stats.wait_s[self.layer] += self.blocked_s + end - t0  # what the caller waited of it
            p._pending[self.layer], p._pending_groups[self.layer] = _Done(res), g


class _Done:
    """A load finished in the calling thread, as the Future of a background one reads (a Future
    costs a lock and a condition per layer and step for nothing to wait on)."""

    __slots__ = ("_result",)

    def __init__(self, result: LoadResult) -> None:
        self._result = result

    def result(self) -> LoadResult:
        return self._result

    def exception(self) -> None:
        return None
