"""The `kvswap` KV connector: every full block goes to the disk tier; a prefix found there is
loaded instead of recomputed, also after an engine restart.

The scheduler side decides (per step, in `build_connector_meta`) which blocks to load and which
to save; the worker side copies saved blocks out of vLLM's paged KV cache during the forward pass
and writes them from a background thread, and loads blocks layer by layer so that layer L's
attention waits only for layer L's reads. Any block that cannot be loaded is reported to vLLM,
which recomputes it (the disk tier is a cache, so `kv_load_failure_policy` is "recompute").
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole,
)

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.predict.base import expected_tokens
from kvswap_vllm.resources import helper_thread_pool
from kvswap_vllm.store import DiskStore, stored_block_hashes
from kvswap_vllm.vllm.blocks import KVLayout, chain_hashes, namespace_seed
from kvswap_vllm.vllm.connector_config import ConnectorConfig
from kvswap_vllm.vllm.identity import EngineIdentity
from kvswap_vllm.vllm.metrics import KVSwapPromMetrics, KVSwapStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvswap")  # under "vllm" so that vLLM's log handlers print it
# Copies of saved blocks waiting for the writer; beyond this, saves are skipped (and counted)
# rather than stalling the forward pass on a slow disk.
MAX_PENDING_SAVE_BYTES = 512 << 20


@dataclass
class SaveSpec:
    """Consecutive blocks of one request to store as groups first_group... of its sequence."""

    sequence: str
    first_group: int
    block_ids: list[int]
    hashes: list[bytes]


@dataclass
class KVSwapMetadata(KVConnectorMetadata):
    """One step's work for the workers."""

    loads: list[tuple[int, bytes]] = field(default_factory=list)  # (block id, content hash)
    saves: list[SaveSpec] = field(default_factory=list)
    blocks_queried: int = 0
    blocks_hit: int = 0
    # KVSwap decoding keys its sequences by each request's first block id:
    # requests finished or preempted since the last step;
    released: list[int] = field(default_factory=list)
    # hashes of the full prompt blocks of requests starting now (their files keep them);
    prompt_hashes: dict[int, list[bytes]] = field(default_factory=dict)
    # tokens each request starting now may reach (predict.base.expected_tokens): its sequence
    # sizes its metadata once instead of growing it;
    expected_tokens: dict[int, int] = field(default_factory=dict)
    # requests starting with a stored prefix: (first block id, the prefix's block ids, hashes).
    adopt: list[tuple[int, list[int], list[bytes]]] = field(default_factory=list)


class KVSwapConnector(KVConnectorBase_V1):
    """vLLM's view of KVSwap: a disk prefix tier for the paged KV cache."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        options = ConnectorConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        identity = EngineIdentity.from_vllm_config(vllm_config)
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
            raise KVSwapError("kvswap connector: models with several KV cache groups (hybrid or "
                              "sliding-window attention) are not supported")
        # The disk tier is a cache: a block that cannot be read is recomputed, never fatal.
        self._kv_transfer_config.kv_load_failure_policy = "recompute"
        if options.sparse and role == KVConnectorRole.SCHEDULER and vllm_config.cache_config.enable_prefix_caching:
            # vLLM's own prefix cache would start a request with context that only vLLM's
            # (never written) paged blocks hold; the scheduler reads this flag after we return.
            log.info("kvswap connector: KVSwap decoding keeps the KV itself; vLLM's prefix caching is off")
            vllm_config.cache_config.enable_prefix_caching = False
        self._scheduler = _SchedulerSide(options, identity) if role == KVConnectorRole.SCHEDULER else None
        self._worker = _WorkerSide(options, identity, vllm_config) if role == KVConnectorRole.WORKER else None

    @property
    def sparse_runtime(self):  # noqa: ANN201 (SparseRuntime, imported lazily)
        """The worker's KVSwap decoding runtime; None when it is off."""
        return self._worker.sparse if self._worker is not None else None

    def get_mem_pool_context(self):  # noqa: ANN201
        """With KVSwap decoding vLLM's paged buffer is never written: map it lazily."""
        if self._worker is None or not self._worker.options.sparse:
            return None
        from kvswap_vllm.vllm.lazy_pool import lazy_kv_buffer

        return lazy_kv_buffer(self._worker.options.root)

    # ----- scheduler side -----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.finished(request.request_id)
        return False, None  # saves copy their blocks during the step: nothing holds the blocks

    # ----- worker side --------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._worker.start_loads(self._get_connector_metadata(), getattr(forward_context, "attn_metadata", None))

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker.save_layer(layer_name, kv_layer, self._get_connector_metadata())

    def wait_for_save(self) -> None:
        self._worker.end_step()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_errors()

    def get_kv_connector_stats(self) -> KVSwapStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVSwapStats:
        return KVSwapStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVSwapPromMetrics:
        return KVSwapPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


@dataclass
class _Request:
    request: "Request"
    sequence: str
    seed: bytes
    hashes: list[bytes] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    # Blocks [0, handled) are saved, scheduled for saving, or were already stored.
    handled: int = 0
    # From the last lookup: (first block index, blocks found, blocks looked up).
    lookup: tuple[int, int, int] = (0, 0, 0)
    # Blocks to load in this request's next step: (first block index, count).
    load: tuple[int, int] | None = None
    # KVSwap decoding: the workers were told this request's prompt hashes, its expected length.
    announced: bool = False
    sized: bool = False

    def hashes_upto(self, n: int, block_size: int) -> list[bytes]:
        if len(self.hashes) < n:
            parent = self.hashes[-1] if self.hashes else None
            self.hashes += chain_hashes(self.seed, self.request.all_token_ids, block_size,
                                        start_block=len(self.hashes), parent=parent,
                                        num_blocks=n - len(self.hashes))
        return self.hashes[:n]


class _SchedulerSide:
    """Which blocks are on disk (an index rebuilt from the files at start) and per-request plans."""

    def __init__(self, options: ConnectorConfig, identity: EngineIdentity) -> None:
        self.options = options
        self.identity = identity
        self.block_size = identity.block_size
        # A block is loadable when every rank holds it; KVSwap decoding has its own disk tier.
        configs = ([identity.sparse_store_config(options)] if options.sparse else
                   [identity.store_config(options, tp, pp) for tp, pp in identity.all_ranks()])
        per_rank = [stored_block_hashes(c) for c in configs]
        self.stored: set[bytes] = set.intersection(*per_rank) if per_rank else set()
        # KVSwap decoding stores prompts only when whole blocks are whole groups.
        self.sparse_prefixes = options.sparse and self.block_size % options.group_size == 0
        self._run = uuid.uuid4().hex[:12]  # sequences of this engine run never collide with older ones
        self._count = 0
        self._reqs: dict[str, _Request] = {}
        self._queried = 0
        self._hit = 0
        self._released: list[int] = []
        log.info("kvswap connector: disk tier %s, %d blocks stored", options.root, len(self.stored))

    def _state(self, request: "Request") -> _Request:
        st = self._reqs.get(request.request_id)
        if st is None:
            lora = request.lora_request.lora_name if request.lora_request else None
            self._count += 1
            st = _Request(request, f"r{self._run}-{self._count}",
                          namespace_seed(self.identity.model_fingerprint, self.block_size, lora,
                                         getattr(request, "cache_salt", None)))
            self._reqs[request.request_id] = st
        return st

    def _cacheable(self, request: "Request") -> bool:
        # Multimodal inputs and prompt embeddings are not covered by token-id hashes.
        return not getattr(request, "mm_features", None) and getattr(request, "prompt_embeds", None) is None

    def matched_tokens(self, request: "Request", num_computed_tokens: int) -> int:
        st = self._state(request)
        st.lookup = (0, 0, 0)
        if not self._cacheable(request) or (self.options.sparse and not self.sparse_prefixes):
            return 0
        limit = (request.num_tokens - 1) // self.block_size  # vLLM must compute at least one token
        first = num_computed_tokens // self.block_size
        if first >= limit:
            return 0
        hashes = st.hashes_upto(limit, self.block_size)
        n = 0
        while first + n < limit and hashes[first + n] in self.stored:
            n += 1
        st.lookup = (first, n, limit - first)
        return n * self.block_size

    def after_alloc(self, request: "Request", num_external_tokens: int) -> None:
        st = self._state(request)
        first, found, queried = st.lookup
        self._queried += queried
        if num_external_tokens > 0:
            n = num_external_tokens // self.block_size
            st.load = (first, n)
            self._hit += n

    def build_meta(self, so: "SchedulerOutput") -> KVSwapMetadata:
        meta = KVSwapMetadata(blocks_queried=self._queried, blocks_hit=self._hit, released=self._released)
        self._queried = self._hit = 0
        self._released = []
        for req_id in so.preempted_req_ids or ():
            st = self._reqs.get(req_id)
            if st is not None and st.block_ids:
                meta.released.append(st.block_ids[0])
                st.block_ids = []
                st.announced = st.sized = False
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                self._plan(st, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id], meta)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids += new_ids[0]
            self._plan(st, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0), meta)
        return meta

    def _plan(self, st: _Request, end_tokens: int, meta: KVSwapMetadata) -> None:
        if self.options.sparse:
            self._plan_sparse(st, meta)
            return
        if st.load is not None:
            first, n = st.load
            meta.loads += [(st.block_ids[first + i], st.hashes[first + i]) for i in range(n)]
            st.load = None
        if not self._cacheable(st.request):
            return
        full = min(end_tokens, len(st.request.all_token_ids), len(st.block_ids) * self.block_size) // self.block_size
        if not self.options.save_decode:
            full = min(full, st.request.num_prompt_tokens // self.block_size)
        if full <= st.handled:
            return
        hashes = st.hashes_upto(full, self.block_size)
        run: SaveSpec | None = None
        for i in range(st.handled, full):
            if hashes[i] in self.stored:
                run = None
                continue
            if run is None:
                run = SaveSpec(st.sequence, i, [], [])
                meta.saves.append(run)
            run.block_ids.append(st.block_ids[i])
            run.hashes.append(hashes[i])
            self.stored.add(hashes[i])
        st.handled = full

    def _plan_sparse(self, st: _Request, meta: KVSwapMetadata) -> None:
        """KVSwap decoding: the worker keeps the KV itself, so a stored prefix is adopted by the
        request's sequence (no copy into vLLM's blocks), and its prompt blocks are announced so
        that its files can serve later requests."""
        if not st.block_ids:
            return
        key = st.block_ids[0]
        if not st.sized:
            meta.expected_tokens[key] = expected_tokens(st.request.num_prompt_tokens, getattr(st.request, "max_tokens", None))
            st.sized = True
        if st.load is not None:
            n = st.load[1]
            meta.adopt.append((key, st.block_ids[:n], st.hashes[:n]))
            st.load = None
        if not st.announced and self.sparse_prefixes and self._cacheable(st.request):
            meta.prompt_hashes[key] = st.hashes_upto(st.request.num_prompt_tokens // self.block_size, self.block_size)
            st.announced = True

    def finished(self, req_id: str) -> None:
        st = self._reqs.pop(req_id, None)
        if st is not None and st.block_ids:
            self._released.append(st.block_ids[0])
        if st is not None and st.announced:  # its prompt's files stay: later requests may adopt them
            self.stored.update(st.hashes[:st.request.num_prompt_tokens // self.block_size])


class _WorkerSide:
    """Copies blocks between vLLM's paged KV cache and this rank's disk tier."""

    def __init__(self, options: ConnectorConfig, identity: EngineIdentity, vllm_config: "VllmConfig | None" = None) -> None:
        self.options = options
        self.identity = identity
        self.vllm_config = vllm_config
        self.sparse = None  # SparseRuntime when KVSwap decoding is on
        self.store: DiskStore | None = None
        self._layers: dict[str, int] = {}
        self._kv: dict[str, torch.Tensor] = {}
        self._layout: KVLayout | None = None
        self._loads: dict[str, Future[list[int]]] = {}
        self._errors: set[int] = set()
        self._stats = KVSwapStats()
        self._lock = threading.Lock()
        self._pending_bytes = 0
        self._loader = helper_thread_pool(1, "kvswap-load")
        self._saver = helper_thread_pool(1, "kvswap-save")
        self._report_lookups = True
        self._step_loads = 0
        self._first_layer = 0
        self._failed_saves: set[tuple[str, int]] = set()

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        layers = {name: extract_layer_index(name) for name in kv_caches}
        self.attach(kv_caches, layers, get_tensor_model_parallel_rank(), get_pp_group().rank_in_group)

    def attach(self, kv_caches: dict[str, torch.Tensor], layers: dict[str, int], tp_rank: int, pp_rank: int) -> None:
        """Use these paged KV tensors (layer name -> tensor) as this rank's shard."""
        # Lookup counters come from the scheduler, once: only rank 0 reports them.
        self._report_lookups = tp_rank == 0 and pp_rank == 0
        self._kv = dict(kv_caches)
        self._layers = dict(layers)
        self._first_layer = min(layers.values())
        first = next(iter(kv_caches.values()))
        self._layout = KVLayout.detect(first, self.identity.block_size, self.identity.num_kv_heads,
                                       self.identity.head_dim, _cuda_layout())
        self.store = DiskStore(self.identity.store_config(self.options, tp_rank, pp_rank))
        if self.options.sparse:
            from kvswap_vllm.vllm.sparse_attention import build_sparse_runtime

            self.sparse = build_sparse_runtime(self.options, self.identity, self.vllm_config)
        log.info("kvswap connector: rank tp%d/pp%d stores %d layers in %s", tp_rank, pp_rank,
                 len(kv_caches), self.store.config.namespace)

    # ----- loads --------------------------------------------------------------------------
    def start_loads(self, meta: KVSwapMetadata, attn_metadata: Any = None) -> None:
        if self._report_lookups:
            self._count(blocks_queried=meta.blocks_queried, blocks_hit=meta.blocks_hit)
        if self.sparse is not None:
            self.sparse.start_step(meta, attn_metadata)
            return
        if not meta.loads or self.store is None:
            return
        self._step_loads = len(meta.loads)
        where = self._locate(meta.loads)
        for name in self._kv:
            self._loads[name] = self._loader.submit(self._load_layer, name, where)

    def _locate(self, loads: list[tuple[int, bytes]]) -> dict[str, list[tuple[int, int]]]:
        """sequence -> [(block id, group id)]; blocks not on disk become load errors."""
        found = [(bid, self.store.find_block(h)) for bid, h in loads]
        if any(loc is None for _, loc in found):
            self.store.flush()  # the block may be this run's own write, still in flight
            found = [(bid, loc or self.store.find_block(h)) for (bid, loc), (_, h) in zip(found, loads)]
        where: dict[str, list[tuple[int, int]]] = {}
        for bid, loc in found:
            if loc is None:
                self._fail([bid])
            else:
                where.setdefault(loc[0], []).append((bid, loc[1]))
        return where

    def _load_layer(self, name: str, where: dict[str, list[tuple[int, int]]]) -> list[int]:
        """Read this layer's blocks into vLLM's KV cache; returns the block ids that failed."""
        failed: list[int] = []
        with torch.inference_mode():
            for sequence, pairs in where.items():
                block_ids = [b for b, _ in pairs]
                try:
                    res = self.store.read_groups(sequence, self._layers[name], [g for _, g in pairs])
                except Exception as exc:  # a vanished or unreadable file: recompute, never crash
                    log.warning("kvswap connector: load of %d blocks failed (%s); recomputing", len(pairs), exc)
                    failed += block_ids
                    continue
                ok = [i for i, hit in enumerate(res.found) if hit]
                failed += [block_ids[i] for i in range(len(block_ids)) if not res.found[i]]
                if ok:
                    self._layout.scatter(self._kv[name], [block_ids[i] for i in ok], res.kv[ok])
                self._count(bytes_loaded=res.bytes_read)
        return failed

    def wait_layer(self, name: str) -> None:
        fut = self._loads.pop(name, None)
        if fut is not None:
            t0 = time.perf_counter()
            self._fail(fut.result())
            self._count(load_seconds=time.perf_counter() - t0)

    def end_step(self) -> None:
        """After the forward pass: every load of the step is finished (a layer that never ran
        still had its blocks loaded), and errors are known."""
        for name in list(self._loads):
            self.wait_layer(name)
        if self._step_loads:
            with self._lock:
                self._stats.data["blocks_loaded"] += self._step_loads - len(self._errors)
            self._step_loads = 0

    def take_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        if self.sparse is not None:
            errors |= self.sparse.take_errors()
        return errors

    def _fail(self, block_ids: list[int]) -> None:
        if block_ids:
            with self._lock:
                new = set(block_ids) - self._errors
                self._errors |= new
                self._stats.data["load_errors"] += len(new)

    # ----- saves --------------------------------------------------------------------------
    def save_layer(self, name: str, kv_layer: torch.Tensor, meta: KVSwapMetadata) -> None:
        if not meta.saves or self.store is None or name not in self._layers:
            return
        for spec in meta.saves:
            nbytes = len(spec.block_ids) * self.store.config.group_bytes
            with self._lock:
                if self._pending_bytes + nbytes > MAX_PENDING_SAVE_BYTES:
                    self._stats.data["saves_skipped"] += len(spec.block_ids)
                    continue
                self._pending_bytes += nbytes
            # Copy now: after this step vLLM may give the blocks to another request.
            data = self._layout.gather(kv_layer, spec.block_ids)
            self._saver.submit(self._write, spec, self._layers[name], data, nbytes)

    def _write(self, spec: SaveSpec, layer: int, data: torch.Tensor, nbytes: int) -> None:
        try:
            ok = self.store.write_groups(spec.sequence, layer, spec.first_group, data, spec.hashes)
        except Exception as exc:  # never take the worker down for a cache write
            log.warning("kvswap connector: saving %d blocks failed: %s", len(spec.block_ids), exc)
            ok = False
        with self._lock:
            self._pending_bytes -= nbytes
            if ok:
                self._stats.data["bytes_saved"] += nbytes
            key = (spec.sequence, spec.first_group)
            if not ok and key not in self._failed_saves:  # count a block once, whichever layers failed
                if len(self._failed_saves) > 100_000:
                    self._failed_saves.clear()
                self._failed_saves.add(key)
                self._stats.data["save_errors"] += len(spec.block_ids)
            elif ok and layer == self._first_layer:
                self._stats.data["blocks_saved"] += len(spec.block_ids)

    # ----- stats and shutdown -------------------------------------------------------------
    def _count(self, **values: float) -> None:
        with self._lock:
            for k, v in values.items():
                self._stats.data[k] += v

    def take_stats(self) -> KVSwapStats | None:
        with self._lock:
            stats, self._stats = self._stats, KVSwapStats()
        return None if stats.is_empty() else stats

    def close(self) -> None:
        if self.sparse is not None:
            self.sparse.close()
        self._saver.shutdown(wait=True)  # queued saves reach the disk before exit
        self._loader.shutdown(wait=True)
        if self.store is not None:
            self.store.close()


def _cuda_layout() -> str:
    try:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout

        return get_kv_cache_layout()
    except Exception:
        return "NHD"

