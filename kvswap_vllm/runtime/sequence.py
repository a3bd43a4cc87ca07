"""One sequence's KV cache in the disk tier, decoded with KVSwap; engine-neutral.

Per layer, memory holds only the low-rank metadata (in the predictor), the hot tier's M/G slots
and a rolling tail of the newest tokens; every full group is in the disk tier. Tensors are
(num_kv_heads, tokens, head_dim). The HF runtime (runtime/hf_disk.py) and the vLLM attention
backend (vllm/sparse_attention.py) both drive this class.

On a GPU (`device`), the tail and the hot tier are in its memory (the model's tensors never
leave it); the predictor's metadata and the disk I/O buffers stay in host memory, so queries
go to the host for selection and full groups go to the host once, when written.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kvswap_vllm.attention.blockwise import BlockwiseSoftmax, attention_with_lse
from kvswap_vllm.hot.tier import HotTier, id_tensor
from kvswap_vllm.predict.base import (ModelShape, Predictor, RestEstimate, SelectionConfig, create_predictor,
                                      select_batch)
from kvswap_vllm.predict.persisted import rows_from_aux, rows_to_aux
from kvswap_vllm.prefetch.pipeline import LayerPrefetcher, OwnLoads
from kvswap_vllm.resources import trim_heap
from kvswap_vllm.store.disk_store import DiskStore, ReadRequest, ReadResult
from kvswap_vllm.store.fileio import aligned_tensor


@dataclass(frozen=True)
class DiskRuntimeConfig:
    """Settings of the disk-backed runtime."""

    selection: SelectionConfig
    predictor: str = "kvswap"
    # Newest groups kept in memory before they go to disk as one file (the rolling tail).
    flush_groups: int = 16
    # Prefill chunk, tokens: bounds prefill memory (its activations) with the block below.
    # Measured on SmolLM2, one 7k-token prompt at M = 320: prefill's peak RSS growth 46-49 MB
    # with 512 against 57-58 MB with 1024 (decode peaks at ~50 MB), time to first token +17%.
    prefill_chunk: int = 512
    # Tokens of the past a prefill chunk reads back from disk at once (its attention merges the
    # blocks exactly): prefill memory does not grow with the context.
    prefill_block: int = 1024
    # False: every load reads its whole selection, resident or not (the no-reuse baseline).
    reuse: bool = True
    # False: no early step reads, and every layer selects from its own query when it runs,
    # with its reads on the critical path (the no-prefetch baseline).
    prefetch: bool = True
    # True: a layer whose selection was predicted (layer-ahead or step start) selects again from
    # its own query when it runs and attends to that; the prediction's reads serve as prefetch,
    # and the groups it missed are read on the critical path. False: attend to the prediction,
    # as the paper does (fewer reads on the critical path; lower quality, see README).
    reselect: bool = True

    def __post_init__(self) -> None:
        if self.prefill_chunk < 1 or self.prefill_block < self.selection.group_size:
            raise ValueError(f"need prefill_chunk >= 1 and prefill_block >= group_size, got {self}")


#: Prefill chunks of at least this many tokens give their freed memory back to the OS after each
#: layer (malloc_trim, 1-2 ms): the heap otherwise keeps a few MB per layer, depending on where
#: long-lived rows (metadata, the tail) land among the transients, and a 7k-token prompt's RSS
#: then grew by 60-300 MB from run to run (with the trim: 80-105 MB, measured).
TRIM_AFTER_TOKENS = 256

#: Layers below this select from their own query (nothing before them predicts it).
FIRST_AHEAD_LAYER = 2


@dataclass(frozen=True)
class PrefixRun:
    """Groups [start, stop) of a sequence are those of another, stored sequence (a cached
    prefix): same positions, so the same group ids."""

    sequence: str
    start: int
    stop: int


@dataclass
class Persistence:
    """A sequence whose files outlive it, for later requests with the same prefix: each file
    carries the predictor's metadata of its groups, and the group completing the i-th block of
    `block_tokens` tokens carries `block_hashes[i]` (prompt blocks only)."""

    block_tokens: int
    block_hashes: list[bytes]

    def hashes_for(self, first_group: int, n: int, group_size: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for g in range(first_group, first_group + n):
            end = (g + 1) * group_size
            block = end // self.block_tokens - 1
            out.append(self.block_hashes[block] if end % self.block_tokens == 0 and block < len(self.block_hashes)
                       else None)
        return out


@dataclass(frozen=True)
class SequenceReader:
    """Reads a sequence's groups: those of its prefix runs from their stored sequences."""

    store: DiskStore
    name: str
    prefix: tuple[PrefixRun, ...] = ()

    def requests(self, layer: int, ids: list[int], out: torch.Tensor) -> list[ReadRequest]:
        """The store reads of groups `ids` (ascending) of `layer` into `out`: one per run of
        ids stored under one sequence, each into its slice of `out`."""
        if not self.prefix:
            return [ReadRequest(self.name, layer, ids, out)]
        parts: list[tuple[str, list[int]]] = []
        for g in ids:
            src = next((r.sequence for r in self.prefix if r.start <= g < r.stop), self.name)
            if parts and parts[-1][0] == src:
                parts[-1][1].append(g)
            else:
                parts.append((src, [g]))
        bounds = np.cumsum([0] + [len(p) for _, p in parts]).tolist()
        return [ReadRequest(src, layer, part, out[lo:hi]) for (src, part), lo, hi in zip(parts, bounds, bounds[1:])]

    def __call__(self, layer: int, ids: list[int], out: torch.Tensor | None = None) -> ReadResult:
        """Groups `ids` (ascending) of `layer`."""
        if out is None:
            out = aligned_tensor((len(ids), *self.store.config.group_shape), self.store.config.torch_dtype)
        return ReadResult.joined(self.store.read_many(self.requests(layer, ids, out)), out)


class KVSwapSequence:
    """The KV of one sequence: disk groups + low-rank metadata + hot tier + tail, per layer."""

    def __init__(self, store: DiskStore, shape: ModelShape, config: DiskRuntimeConfig, adapter: object | None = None,
                 name: str | None = None, prefix: list[PrefixRun] = (), persist: Persistence | None = None,
                 device: torch.device | str = "cpu", expected_tokens: int = 0) -> None:
        """`prefix`: runs of stored groups this sequence starts with (their files and metadata are
        checked now: a StoreError or MetadataError says the prefix cannot be used). `persist`:
        keep this sequence's files when it closes (else they are deleted: private data).
        `device`: where the model's K/V tensors are (the tail and hot tier live there).
        `expected_tokens`: the length it may reach (predict.base.expected_tokens), for which its
        metadata is sized once (0: unknown, it grows)."""
        self.store, self.shape, self.config = store, shape, config
        self.device = torch.device(device)
        self.group_size = config.selection.group_size
        self.name = name or f"seq-{uuid.uuid4().hex[:12]}"
        self.predictor: Predictor = create_predictor(config.predictor, shape, config.selection, adapter)
        self.predictor.reserve(expected_tokens)  # before a prefix's metadata: never copied again
        self.persist = persist
        self.prefix = list(prefix)
        for run in self.prefix:  # pinned against eviction while in use
            store.open_sequence(run.sequence, private=False)
        store.open_sequence(self.name, private=persist is None)
        try:
            self._import_prefix_metadata()
        except BaseException:
            self._release_files()
            raise
        # Not a bound method: the hot tier must not refer back to the sequence, or the two would be
        # a cycle that only the cyclic GC frees (its buffers then outlived closed sequences).
        self._reader = SequenceReader(store, self.name, tuple(self.prefix))
        self.hot = HotTier(store, self.name, config.selection.budget_groups, requests=self._reader.requests,
                           reuse=config.reuse, device=self.device)
        self.prefetch = LayerPrefetcher(self.hot)
        n = shape.num_layers
        start = self.prefix[-1].stop if self.prefix else 0
        self.disk_groups = [start] * n
        self._k: list[torch.Tensor | None] = [None] * n  # the tails
        self._v: list[torch.Tensor | None] = [None] * n
        # Layers whose selection for this step is submitted -> from their own query (else predicted).
        self._submitted: dict[int, bool] = {}
        # The query each layer selected with last: the next step's early prefetch reuses it.
        self._query: list[torch.Tensor | None] = [None] * n
        # Full groups each layer had when it last selected (-1: never selected yet).
        self._selected_over = [-1] * n
        # The groups each layer attended to at its last step (selections favour them).
        self._attended: list[torch.Tensor | None] = [None] * n
        # Own-query loads whose reads are in flight (submit); settled before the hot tier or its
        # staging buffer is used again.
        self._in_flight: OwnLoads | None = None

    def _import_prefix_metadata(self) -> None:
        for layer in range(self.shape.num_layers):
            for run in self.prefix:
                for first, n, aux in self.store.segment_aux(run.sequence, layer, run.start, run.stop - 1):
                    rows = rows_from_aux(aux, self.predictor.metadata_id, f"{run.sequence} layer {layer} group {first}")
                    if rows.shape[0] != n:
                        raise ValueError(f"{run.sequence} layer {layer}: {rows.shape[0]} metadata rows for {n} groups")
                    lo, hi = max(first, run.start), min(first + n, run.stop)
                    self.predictor.import_groups(layer, rows[lo - first:hi - first])

    def read_groups(self, layer: int, ids: list[int], out: torch.Tensor | None = None) -> ReadResult:
        """Groups `ids` (ascending) of `layer`, from the prefix runs' sequences or this one."""
        return self._reader(layer, ids, out)

    def length(self, layer: int) -> int:
        tail = 0 if self._k[layer] is None else self._k[layer].shape[1]
        return self.disk_groups[layer] * self.group_size + tail

    # ----- prefill: dense over everything so far --------------------------------------------
    def prefill_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          seed_prefetch: bool = False) -> torch.Tensor:
        """Append a chunk (k, v: (H, T, d)) and attend its queries q (Hq, T, d) to the whole
        sequence: to the chunk itself (causal), the unflushed tail, and the disk groups read back
        `prefill_block` tokens at a time, merged exactly; then write the chunk's full groups to
        disk. Memory: one block of the past, never all of it. `seed_prefetch`: the chunk's last
        query seeds the first decode step's early prefetch."""
        self._settle()
        if seed_prefetch:
            self._query[layer] = q[:, -1].to("cpu", copy=True)
        acc = BlockwiseSoftmax()
        acc.add(*attention_with_lse(q, k, v, scale, causal=True))
        if self._k[layer] is not None and self._k[layer].shape[1]:
            acc.add(*attention_with_lse(q, self._k[layer], self._v[layer], scale, causal=False))
        for past_k, past_v in self._past_blocks(layer):
            acc.add(*attention_with_lse(q, past_k, past_v, scale, causal=False))
        self._append(layer, k, v)
        self._flush(layer, self._k[layer].shape[1] // self.group_size * self.group_size)
        out = acc.result(q.dtype)
        if q.shape[1] >= TRIM_AFTER_TOKENS:
            trim_heap()
        return out

    def _past_blocks(self, layer: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The layer's disk groups, read back in blocks of about `prefill_block` tokens: (K, V)."""
        groups = self.disk_groups[layer]
        if groups:
            self.store.flush()  # the previous chunk's writes
        step = max(1, self.config.prefill_block // self.group_size)
        for first in range(0, groups, step):
            res = self.read_groups(layer, list(range(first, min(first + step, groups))))
            if not res.found.all():
                raise RuntimeError(f"disk tier lost groups of layer {layer} of {self.name} during prefill")
            kv = res.kv.to(self.device)  # (n, H, 2, G, d)
            n, h, _, g, d = kv.shape
            yield (kv[:, :, 0].transpose(0, 1).reshape(h, n * g, d), kv[:, :, 1].transpose(0, 1).reshape(h, n * g, d))

    # ----- decode: selected groups + tail ---------------------------------------------------
    def submit(self, layer: int, query: torch.Tensor, ahead: bool) -> None:
        """Select `layer`'s groups for `query` (num_q_heads, head_dim), post-RoPE, and start
        loading the ones not resident; this is the selection the layer attends to. `ahead` =
        predicted from the previous layer's input (loaded in the background), else the layer's
        own query (loaded now: the layer attends to it next)."""
        KVSwapSequence.submit_batch([self], layer, query.unsqueeze(0), ahead)

    @staticmethod
    def submit_batch(seqs: list["KVSwapSequence"], layer: int, queries: torch.Tensor, ahead: bool) -> None:
        """`submit` for several sequences (same config, one store) at once: queries
        (len(seqs), q_heads, d), selected together (see predict.base.select_batch); loads from
        own queries go to the store together and stay in flight until the sequences next use
        their hot tiers (`hot_kv`: the engine computes the layer's K/V meanwhile)."""
        if not ahead:
            loads = KVSwapSequence.start_batch(seqs, layer, queries)
            for seq in seqs:
                seq._in_flight = loads
            return
        for seq in seqs:
            seq._settle()
        groups, sources = KVSwapSequence._select(seqs, layer, queries, ahead=True)
        for seq, ids, source in zip(seqs, groups, sources):
            seq.prefetch.submit(layer, ids, source)

    @staticmethod
    def start_batch(seqs: list["KVSwapSequence"], layer: int, queries: torch.Tensor) -> OwnLoads:
        """`submit_batch` from the sequences' own queries, started: the loads' reads are in flight
        (with kernel AIO) until `finish()` of the result, which comes before the layer attends.
        The predictors' estimates of the rest are computed while the reads are in flight."""
        for seq in seqs:
            seq._settle()
        groups, sources = KVSwapSequence._select(seqs, layer, queries, ahead=False)
        loads = LayerPrefetcher.start_now([s.prefetch for s in seqs], layer, groups, sources)
        for seq in seqs:
            seq.predictor.prepare_rest(layer)
        return loads

    def _settle(self) -> None:
        """Finish the own-query loads still in flight (they fill the hot tier from its staging buffer)."""
        if self._in_flight is not None:
            loads, self._in_flight = self._in_flight, None
            loads.finish()

    @staticmethod
    def _select(seqs: list["KVSwapSequence"], layer: int, queries: torch.Tensor,
                ahead: bool) -> tuple[list[torch.Tensor], list[str]]:
        queries = queries.to("cpu")  # the predictor's metadata is in host memory
        # An ahead selection is attended to only where the own query does not select again.
        rest = not ahead or not seqs[0].config.reselect
        groups = select_batch([s.predictor for s in seqs], layer, queries, [s._attended[layer] for s in seqs], rest)
        return groups, [seq._note_selection(layer, query, ahead) for seq, query in zip(seqs, queries)]

    def needs_selection(self, layer: int) -> bool:
        """`layer` still has to select from its own query this step: nothing is submitted for it
        yet, or only a prediction and the config re-selects."""
        own = self._submitted.get(layer)
        return own is None or (not own and self.config.reselect)

    def _note_selection(self, layer: int, query: torch.Tensor, ahead: bool) -> str:
        """Record that `layer` selected with `query` this step; the load's source."""
        self._query[layer] = query.clone()  # never a view that keeps an engine's batch alive
        source = "ahead" if ahead else "exact" if layer in self._submitted else "own"
        self._submitted[layer] = not ahead
        self._selected_over[layer] = self.predictor.num_groups(layer)
        return source

    def prefetch_step(self) -> None:
        """At the start of a decode step: every layer >= FIRST_AHEAD_LAYER that has selected
        before re-selects with that query and starts its reads now, before the forward pass
        reaches it; its layer-ahead selection then only reads the difference. A layer without a
        new full group since it selected with that query would get what its hot tier holds: skipped."""
        if not self.config.prefetch:
            return
        self._settle()
        for layer in range(FIRST_AHEAD_LAYER, self.shape.num_layers):
            q, groups = self._query[layer], self.predictor.num_groups(layer)
            if q is not None and layer not in self._submitted and groups and groups != self._selected_over[layer]:
                self.prefetch.submit(layer, self.predictor.select(layer, q, self._attended[layer], rest=False), "step")
                self._selected_over[layer] = groups

    def decode_tail(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one step's token(s); returns the whole tail, new tokens included. A tail that is
        now full goes to disk right after, so the next step can already select its groups."""
        self._append(layer, k, v)
        tail_k, tail_v = self._k[layer], self._v[layer]
        if tail_k.shape[1] >= self.group_size * self.config.flush_groups:
            self._flush(layer, tail_k.shape[1] // self.group_size * self.group_size)
        return tail_k, tail_v

    def hot_kv(self, layer: int, query: torch.Tensor | None = None,
               ordered: bool | None = True) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer`'s selected groups, (H, slots*G, d), in the order of the selection;
        `ordered=False`: in any order, without a copy where it can (HotTier.gather); None: so
        where the layer has an estimate of the rest (`rest`: its attention is then
        sparse.decode_attention's, which no order changes), else in order (the runtimes then
        attend with HF's SDPA, whose sums follow the order, as the reference runtime's).
        Selects from `query` now if nothing was submitted for this layer."""
        if self.needs_selection(layer) and query is not None:
            self.submit(layer, query, ahead=False)
        elif layer not in self._submitted:
            raise RuntimeError(f"layer {layer}: no selection submitted and no query given")
        self._submitted.pop(layer, None)
        self._settle()
        res = self.prefetch.wait(layer)
        if res.unavailable:
            raise RuntimeError(f"layer {layer}: groups {res.unavailable[:5]} are not in the disk tier")
        self._attended[layer] = id_tensor(res.groups)
        return self.hot.gather(layer, res, self.rest(layer) is None if ordered is None else ordered)

    def rest(self, layer: int) -> RestEstimate | None:
        """The predictor's estimate of the attention to the full groups `layer` did not attend to
        at this step (after `hot_kv`), or None: nothing left out, or a predictor without one."""
        attended = self._attended[layer]
        return None if attended is None else self.predictor.rest(layer, attended)

    def decode_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                  query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of `layer`: K and V to attend to (selected groups, then the tail)."""
        (hk, tail_k), (hv, tail_v) = self.decode_blocks(layer, k, v, query, ordered=True)
        return torch.cat([hk, tail_k], dim=1), torch.cat([hv, tail_v], dim=1)

    def decode_blocks(self, layer: int, k: torch.Tensor, v: torch.Tensor, query: torch.Tensor | None = None,
                      ordered: bool | None = True) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                             tuple[torch.Tensor, torch.Tensor]]:
        """`decode_kv` as the blocks attention.sparse.decode_attention takes, not joined:
        ((hot K, tail K), (hot V, tail V)); `ordered` as in `hot_kv`."""
        hk, hv = self.hot_kv(layer, query, ordered)
        tail_k, tail_v = self.decode_tail(layer, k, v)
        return (hk, tail_k), (hv, tail_v)

    # ----- tail -> disk ---------------------------------------------------------------------
    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # Always a new tensor: `k` may be a view into the engine's activations for the whole
        # batch, which must not stay alive as this sequence's tail.
        self._k[layer] = k.clone() if self._k[layer] is None else torch.cat([self._k[layer], k], dim=1)
        self._v[layer] = v.clone() if self._v[layer] is None else torch.cat([self._v[layer], v], dim=1)

    def _flush(self, layer: int, tokens: int) -> None:
        """Write the first `tokens` tail tokens (whole groups) to disk, their keys to the metadata."""
        if tokens <= 0:
            return
        g = self.group_size
        k, v = self._k[layer][:, :tokens], self._v[layer][:, :tokens]  # (H, T, d)
        h, d, n = k.shape[0], k.shape[-1], tokens // g
        # One copy into the store's layout (n, H, 2, G, d), in page-aligned memory, which the
        # store then writes to disk without another copy.
        groups = aligned_tensor((n, h, 2, g, d), k.dtype)
        groups[:, :, 0] = k.reshape(h, n, g, d).transpose(0, 1)
        groups[:, :, 1] = v.reshape(h, n, g, d).transpose(0, 1)
        first = self.disk_groups[layer]
        # From the host copy: the predictor's metadata lives in host memory.
        rows = self.predictor.group_metadata(layer, groups[:, :, 0].transpose(1, 2), groups[:, :, 1].transpose(1, 2))
        hashes, aux = None, None
        if self.persist is not None:
            hashes = self.persist.hashes_for(first, n, g)
            aux = rows_to_aux(rows, self.predictor.metadata_id)
        if not self.store.write_groups_async(self.name, layer, first, groups, hashes, aux).result():
            raise RuntimeError("the disk tier refused a write (capacity or disk full)")
        self.predictor.import_groups(layer, rows)
        self.disk_groups[layer] += n
        # Copies, not views: a view would keep the whole flushed chunk's storage alive.
        self._k[layer] = self._k[layer][:, tokens:].clone()
        self._v[layer] = self._v[layer][:, tokens:].clone()

    def tail_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)

    def stats(self) -> dict:
        return {"reuse_rate": self.hot.stats.reuse_rate, "bytes_read": self.hot.stats.bytes_read,
                "hot_tier_bytes": self.hot.nbytes, "metadata_bytes": self.predictor.metadata_bytes(),
                "tail_bytes": self.tail_bytes(),
                "prefetch_overlap": self.prefetch.stats.overlap, "prefetched_loads": self.prefetch.stats.ahead,
                "synchronous_loads": self.prefetch.stats.synchronous,
                "reads_by_source": self.prefetch.stats.as_dict()["by_source"]}

    def close(self) -> None:
        try:
            self._settle()  # no read may still land in buffers about to be freed
        finally:
            self.prefetch.close()
        self._release_files()

    def _release_files(self) -> None:
        self.store.release_sequence(self.name)
        for run in self.prefix:
            self.store.release_sequence(run.sequence)


#: A batch's own-query loads of a layer go in this many parts (see decode_in_parts).
DECODE_PARTS = 2


def decode_in_parts(seqs: list[KVSwapSequence], layer: int, queries: torch.Tensor,
                    attend: Callable[[int], None], parts: int = DECODE_PARTS) -> None:
    """Select `layer`'s groups of each sequence from its own query (queries[i]), load them and
    call `attend(i)` once sequence i's are resident, in `parts` consecutive parts of the batch:
    a part's reads are in flight while the next part selects and the previous one attends, so on
    a CPU that scores and attends, the disk's time hides behind that work."""
    bounds = np.linspace(0, len(seqs), min(parts, len(seqs)) + 1).round().astype(int).tolist()
    started: list[tuple[range, OwnLoads]] = []
    for lo, hi in zip(bounds, bounds[1:]):
        started.append((range(lo, hi), KVSwapSequence.start_batch(seqs[lo:hi], layer, queries[lo:hi])))
        if len(started) > 1:
            _attend_part(*started[-2], attend)
    if started:
        _attend_part(*started[-1], attend)


def _attend_part(rows: range, loads: OwnLoads, attend: Callable[[int], None]) -> None:
    loads.finish()
    for i in rows:
        attend(i)
