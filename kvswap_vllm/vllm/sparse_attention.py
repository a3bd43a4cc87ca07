"""KVSwap decoding inside vLLM (CPU backend): vLLM's block ids are logical, the KV lives in
KVSwapSequences (disk tier + hot tier + tail), and decode attends to the predicted groups.

Installed by the plugin as an override of CPU_ATTN; it is plain vLLM unless the `kvswap`
connector runs with a predictor (`kv_connector_extra_config: {"predictor": "kvswap", ...}`):
- `do_kv_cache_update` does not write vLLM's paged buffer (whose pages are then never touched:
  the connector maps it lazily, so the logical pool costs no memory);
- `forward` appends each request's new K/V to its sequence; a prefill chunk attends densely to
  everything so far (read back from the disk tier one layer at a time), a decode token to the
  selected groups (loaded into the hot tier, reusing resident ones) plus the tail.
Decode reads start early: at the start of the step (the connector's start_load_kv, or layer 0's
attention when vLLM starts loads after the forward pass) every layer >= 2 re-selects with the
query it used last (the previous step's, or the last prompt token's) and starts its reads;
inside the pass, layer L's input predicts layer L+1's query (layer_ahead.py, eager mode) and
that selection is attended; layers 0-1, or all layers of a compiled model, select from their
own query.
A request is recognised by its first block id; its sequence starts when its context is 0
tokens, or adopts a stored prompt (files + low-rank metadata, announced by the scheduler), and
is released when the scheduler finishes or preempts it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from kvswap_vllm.attention.sparse import decode_attention
from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.predict.adapter import adapter_for
from kvswap_vllm.predict.base import ModelShape, SelectionConfig
from kvswap_vllm.resources import return_freed_memory_promptly, trim_heap
from kvswap_vllm.runtime.sequence import DiskRuntimeConfig, KVSwapSequence, Persistence, PrefixRun, decode_in_parts
from kvswap_vllm.store import DiskStore
from kvswap_vllm.store.errors import MissingGroupsError
from kvswap_vllm.store.profiles import get_profile
from kvswap_vllm.vllm.layer_ahead import LayerAhead

log = logging.getLogger("vllm.kvswap")
# Where the worker writes its memory peaks when it shuts down (benchmarks set it).
STATS_ENV = "KVSWAP_STATS_FILE"
STATS_INTERVAL_S = 2.0


class SparseRuntime:
    """The worker's KVSwap sequences, keyed by each request's first vLLM block id."""

    def __init__(self, store, shape, config: DiskRuntimeConfig, adapter: object | None, block_tokens: int = 0) -> None:
        """`block_tokens`: vLLM's block size when prompts are kept for later requests (a
        multiple of G), else 0."""
        self.store, self.shape, self.config, self.adapter = store, shape, config, adapter
        self.block_tokens = block_tokens
        self._seqs: dict[int, KVSwapSequence] = {}
        # Requests whose prompt blocks their files keep (announced by the scheduler).
        self._persist: dict[int, Persistence] = {}
        self._expected: dict[int, int] = {}  # first block id -> tokens its request may reach
        # Requests whose stored prefix could not be adopted: vLLM recomputes them (their block
        # ids go back as load errors); until then their rows are skipped.
        self._failed: set[int] = set()
        self._errors: set[int] = set()
        self.adopted_tokens = 0
        self._stats_written = time.monotonic()
        self._step_view: _StepView | None = None
        self._started: Any = None  # the connector metadata of the step start_step last ran for
        self.layer_ahead: LayerAhead | None = None
        self.steps = 0
        # Steps in which every request decoded, and the disk's read busy time in them.
        self.decode_io = {"steps": 0, "read_busy_s": 0.0}
        self._io_since: float | None = None
        # Reads per mechanism (step / ahead / own) of the sequences released so far.
        self.reads: dict[str, dict[str, int]] = {}
        # Peak over steps of what the live sequences hold in memory (hot tier, metadata, tails).
        self.peak = {"kv_memory_bytes": 0, "hot_tier_bytes": 0, "metadata_bytes": 0, "tail_bytes": 0, "sequences": 0}

    def start_step(self, meta: Any, attn_metadata: Any = None) -> None:
        """Once per step, before any request is attended: release finished requests, adopt
        stored prefixes, and start every decoding request's early reads (`attn_metadata`: the
        step's, a dict of layer name -> metadata, or one metadata). vLLM calls the connector's
        start_load_kv before the forward pass only for steps with loads (else after it), so
        layer 0's attention calls this too; the second call of a step does nothing."""
        if meta is self._started:
            return
        self._started = meta
        self.release(meta.released)
        for key, hashes in meta.prompt_hashes.items():
            self._persist[key] = Persistence(self.block_tokens, hashes)
        self._expected.update(meta.expected_tokens)
        for key, block_ids, hashes in meta.adopt:
            self._adopt(key, block_ids, hashes)
        attn = next(iter(attn_metadata.values()), None) if isinstance(attn_metadata, dict) else attn_metadata
        if attn is not None and hasattr(attn, "query_start_loc"):
            for request in self._view(attn).decoding:
                if request.first in self._seqs:
                    self._seqs[request.first].prefetch_step()

    def _adopt(self, key: int, block_ids: list[int], hashes: list[bytes]) -> None:
        try:
            prefix = self._prefix_runs(hashes)
            seq = KVSwapSequence(self.store, self.shape, self.config, self.adapter, prefix=prefix,
                                 persist=self._persist.get(key), expected_tokens=self._expected.pop(key, 0))
        except (KVSwapError, OSError, ValueError) as exc:
            log.warning("kvswap: a stored prefix of %d blocks cannot be used (%s); recomputing it", len(hashes), exc)
            self._failed.add(key)
            self._errors.update(block_ids)
            return
        self._drop(key)
        self._seqs[key] = seq
        self.adopted_tokens += len(hashes) * self.block_tokens

    def _prefix_runs(self, hashes: list[bytes]) -> list[PrefixRun]:
        """Where the blocks with these (chained) hashes are stored, as runs of groups."""
        per_block = self.block_tokens // self.config.selection.group_size
        runs: list[PrefixRun] = []
        for i, h in enumerate(hashes):
            loc = self.store.find_block(h)
            if loc is None or loc[1] != (i + 1) * per_block - 1:
                raise MissingGroupsError(f"block {i} of the prefix is not in the disk tier")
            if runs and runs[-1].sequence == loc[0]:
                runs[-1] = PrefixRun(loc[0], runs[-1].start, (i + 1) * per_block)
            else:
                runs.append(PrefixRun(loc[0], i * per_block, (i + 1) * per_block))
        return runs

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def release(self, keys: list[int]) -> None:
        closed = False
        for key in keys:
            self._persist.pop(key, None)
            self._expected.pop(key, None)
            self._failed.discard(key)
            closed |= self._drop(key)
        if closed:
            trim_heap()  # what the finished requests held goes back to the OS now

    def _drop(self, key: int) -> bool:
        """Close the request's sequence, if any, counting its reads; True if there was one."""
        seq = self._seqs.pop(key, None)
        if seq is None:
            return False
        self._count_reads(seq)
        seq.close()
        return True

    def _count_reads(self, seq: KVSwapSequence) -> None:
        """Fold a finished sequence's reads per mechanism into the runtime's totals."""
        for source, st in seq.prefetch.stats.as_dict()["by_source"].items():
            total = self.reads.setdefault(source, dict.fromkeys(st, 0))
            for k, v in st.items():
                total[k] += v

    def _sequence(self, key: int, context: int, layer: int) -> KVSwapSequence:
        seq = self._seqs.get(key)
        if context == 0 and layer == 0:  # a request's first chunk: a fresh sequence
            self._failed.discard(key)
            self._drop(key)
            seq = self._seqs[key] = KVSwapSequence(self.store, self.shape, self.config, self.adapter,
                                                   persist=self._persist.get(key),
                                                   expected_tokens=self._expected.pop(key, 0))
        if seq is None or seq.length(layer) != context:
            raise RuntimeError(f"kvswap: request with first block {key} has {context} tokens of context "
                               f"at layer {layer}, but its KVSwap sequence holds "
                               f"{None if seq is None else seq.length(layer)}")
        return seq

    def _view(self, meta: Any) -> "_StepView":
        """This step's per-request rows, computed once per step (every layer shares `meta`)."""
        if self._step_view is None or self._step_view.meta is not meta:
            self._step_view = _StepView(meta)
        return self._step_view

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               meta: Any, output: torch.Tensor, scale: float, step: Any = None) -> torch.Tensor:
        """query (T, Hq, D), key/value (T, Hkv, D) for the batch's T new tokens; fills output.
        `meta`: the attention metadata; `step`: the connector's metadata of this step."""
        view = self._view(meta)
        if layer == 0:
            self._account_step_io(view)
            if step is not None:
                self.start_step(step, meta)
            self.steps += 1
            self._track_memory()
        out = output[:meta.num_actual_tokens].view(-1, self.shape.num_q_heads, self.shape.head_dim)

        def run(request: _Request) -> None:
            self._attend_request(layer, request, query, key, value, out, scale)

        own = self._own_rows(layer, view)
        if own:  # selected and loaded in parts, each part's reads hidden behind other parts' work
            decode_in_parts([seq for _, seq in own], layer, query[torch.tensor([r.start for r, _ in own])],
                            lambda i: run(own[i][0]))
        done = {r for r, _ in own}
        for request in view.requests:
            if request not in done:
                run(request)
        return output

    def _attend_request(self, layer: int, request: "_Request", query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, out: torch.Tensor, scale: float) -> None:
        """One request's rows s:e of this layer: a decode token to its selection + tail, a prefill
        chunk densely to everything so far."""
        s, e, context, first = request
        if first in self._failed and context > 0:
            return  # vLLM discards this step of the request and recomputes it
        seq = self._sequence(first, context, layer)
        q, k, v = query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1)
        try:
            if e - s == 1 and context > 0:
                kk, vv = seq.decode_blocks(layer, k, v, q[:, 0], ordered=None)
                o = decode_attention(q, kk, vv, scale, seq.rest(layer))
            else:
                o = seq.prefill_attention(layer, q, k, v, scale, seed_prefetch=True)
        except (KVSwapError, OSError, RuntimeError) as exc:
            self._fail(first, context, exc)
            return
        out[s:e] = o.transpose(0, 1)

    def _account_step_io(self, view: "_StepView") -> None:
        """Close the previous step's I/O account and open this step's: the disk tier's read busy
        time of steps in which every request decodes (benchmarks report it as I/O-only time)."""
        busy = self.store.stats.read_busy_s
        if self._io_since is not None:
            self.decode_io["steps"] += 1
            self.decode_io["read_busy_s"] += busy - self._io_since
        pure_decode = bool(view.requests) and len(view.decoding) == len(view.requests)
        self._io_since = busy if pure_decode else None

    def _own_rows(self, layer: int, view: "_StepView") -> list[tuple["_Request", KVSwapSequence]]:
        """Decoding requests with no selection for this layer yet (layers 0-1, or every layer
        without layer-ahead): they select from their own queries, all together."""
        return [(request, seq) for request in view.decoding
                if request.first not in self._failed and (seq := self._seqs.get(request.first)) is not None
                and seq.needs_selection(layer) and seq.length(layer) > 0]

    def _fail(self, key: int, context: int, exc: BaseException) -> None:
        """The disk tier lost part of a request's KV (a damaged or evicted file, an I/O error):
        vLLM recomputes the request from its first block, which it reads as a load error. A
        request with no context yet has nothing to recompute from: that error is raised."""
        self._drop(key)
        if context == 0:
            raise KVSwapError(f"kvswap: cannot keep a new request's KV in the disk tier ({exc}); free disk "
                              "space or raise capacity_gb") from exc
        log.warning("kvswap: a request lost KV from the disk tier (%s); vLLM recomputes it", exc)
        self._failed.add(key)
        self._errors.add(key)

    def submit_ahead(self, layer: int, layer_name: str, predict: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Layer-ahead: `predict(rows)` gives `layer`'s predicted queries (rows, Hq, D) for the
        given rows of the step's tokens; each decoding request submits its selection."""
        if active_runtime() is None:
            return
        from vllm.forward_context import get_forward_context

        metas = get_forward_context().attn_metadata
        meta = metas.get(layer_name) if isinstance(metas, dict) else None
        if meta is None:
            return
        view = self._view(meta)
        rows = [(request.start, request.first) for request in view.decoding if request.first in self._seqs]
        if not rows:
            return
        queries = predict(torch.tensor([r for r, _ in rows]))
        KVSwapSequence.submit_batch([self._seqs[key] for _, key in rows], layer, queries, ahead=True)

    def _track_memory(self) -> None:
        now = {"hot_tier_bytes": sum(s.hot.nbytes for s in self._seqs.values()),
               "metadata_bytes": sum(s.predictor.metadata_bytes() for s in self._seqs.values()),
               "tail_bytes": sum(s.tail_bytes() for s in self._seqs.values()), "sequences": len(self._seqs)}
        now["kv_memory_bytes"] = now["hot_tier_bytes"] + now["metadata_bytes"] + now["tail_bytes"]
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        if time.monotonic() - self._stats_written > STATS_INTERVAL_S:
            self.write_stats()

    def write_stats(self) -> None:
        """Write peaks and read counters to $KVSWAP_STATS_FILE (benchmarks read them; a server
        killed with a signal may never close the runtime, so this also runs every few seconds)."""
        path = os.environ.get(STATS_ENV)
        if path:
            self._stats_written = time.monotonic()
            data = {"peak": self.peak, "steps": self.steps, "decode_io": self.decode_io, "reads": self.reads,
                    "adopted_tokens": self.adopted_tokens, "store": self.store.stats.as_dict()}
            tmp = Path(f"{path}.tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(path)

    def close(self) -> None:
        self._track_memory()
        if self.layer_ahead is not None:
            self.layer_ahead.close()
        self.release(list(self._seqs))
        self.write_stats()
        self.store.close()

class _Request(NamedTuple):
    """One request of a step: its rows start:end of the batch's tokens, its context tokens
    before them, and its first block id (which names its sequence)."""

    start: int
    end: int
    context: int
    first: int


class _StepView:
    """The step's requests, as Python values."""

    def __init__(self, meta: Any) -> None:
        self.meta = meta
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        first_blocks = meta.block_table[:, 0].tolist()
        self.requests = [_Request(starts[i], starts[i + 1], seq_lens[i] - (starts[i + 1] - starts[i]), first_blocks[i])
                         for i in range(len(seq_lens)) if starts[i + 1] > starts[i]]
        # The requests decoding one token.
        self.decoding = [r for r in self.requests if r.end - r.start == 1 and r.context > 0]


def build_sparse_runtime(options: Any, identity: Any, vllm_config: Any) -> SparseRuntime:
    """The worker's runtime for the connector's options (ConnectorConfig, EngineIdentity)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise KVSwapError("kvswap connector: KVSwap decoding inside vLLM (predictor=...) runs on the CPU "
                          "backend for now; leave predictor unset on GPUs (the prefix tier works there)")
    if identity.tp_size != 1 or identity.pp_size != 1:
        raise KVSwapError("kvswap connector: KVSwap decoding inside vLLM needs tensor and pipeline parallel "
                          "size 1 for now")
    mc = vllm_config.model_config
    shape = ModelShape(identity.num_layers, mc.get_num_attention_heads(vllm_config.parallel_config),
                       identity.num_kv_heads, identity.head_dim)
    token_bytes = shape.token_bytes(getattr(torch, identity.dtype).itemsize)
    budget = mc.max_model_len if options.predictor == "dense" else options.tokens_per_layer(
        token_bytes, shape.num_layers, vllm_config.scheduler_config.max_num_seqs)
    selection = SelectionConfig(budget_tokens=budget, group_size=options.group_size, hysteresis=options.hysteresis,
                                residual_rank=options.residual_rank, key_rank=options.key_rank,
                                key_bits=options.key_bits)
    adapter = adapter_for(options.predictor, identity.model_fingerprint, shape.head_dim)
    if not return_freed_memory_promptly():
        log.info("kvswap: not glibc: freed memory may stay resident after large transient tensors")
    throttle = get_profile(options.storage_profile).throttle() if options.throttle_reads else None
    store = DiskStore(identity.sparse_store_config(options), throttle=throttle)
    block_tokens = identity.block_size if identity.block_size % options.group_size == 0 else 0
    log.info("kvswap: KVSwap decoding in vLLM: predictor %s, M=%d tokens, G=%d, disk tier %s%s",
             options.predictor, budget, options.group_size, store.config.namespace,
             f", reads throttled to the {options.storage_profile} profile" if throttle else "")
    config = DiskRuntimeConfig(selection, options.predictor, reuse=options.reuse, prefetch=options.prefetch,
                                reselect=options.reselect)
    runtime = SparseRuntime(store, shape, config, adapter, block_tokens)
    if options.predictor == "dense" or not options.prefetch:
        pass  # nothing to predict (everything is selected), or the no-prefetch ablation
    elif _eager(vllm_config):
        runtime.layer_ahead = LayerAhead(runtime, shape.num_layers)
    else:
        log.info("kvswap: the model is compiled, so layers select from their own query (exact, but loads "
                 "wait on the critical path); run with enforce_eager (--enforce-eager) for layer-ahead prefetch")
    return runtime


def _eager(vllm_config: Any) -> bool:
    from vllm.config import CompilationMode

    return vllm_config.model_config.enforce_eager or vllm_config.compilation_config.mode == CompilationMode.NONE


def active_runtime() -> tuple[SparseRuntime, Any] | None:
    """The sparse runtime and this step's connector metadata, or None (stock vLLM, or a
    warm-up/profile run, which has no metadata)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    runtime = getattr(connector, "sparse_runtime", None)
    if runtime is None or not connector.has_connector_metadata():
        return None
    return runtime, connector._get_connector_metadata()


class KVSwapCPUAttentionImpl(CPUAttentionBackendImpl):
    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if active_runtime() is None or not self._decoder():
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        # else: KVSwap keeps the KV itself; vLLM's paged buffer stays untouched.

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = active_runtime()
        if active is None or attn_metadata is None or not self._decoder():
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        from vllm.model_executor.models.utils import extract_layer_index

        runtime, meta = active
        n = attn_metadata.num_actual_tokens
        with torch.inference_mode():
            return runtime.attend(extract_layer_index(layer.layer_name), query[:n], key[:n], value[:n],
                                  attn_metadata, output, self.scale, meta)

    def _decoder(self) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return self.attn_type == AttentionType.DECODER


class KVSwapCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[KVSwapCPUAttentionImpl]:
        return KVSwapCPUAttentionImpl
