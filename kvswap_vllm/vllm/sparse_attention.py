"""KVSwap decoding inside vLLM (CPU backend): vLLM's block ids are logical, the KV lives in
KVSwapSequences (disk tier + hot tier + tail), and decode attends to the predicted groups.

Installed by the plugin as an override of CPU_ATTN; it is plain vLLM unless the `kvswap`
connector runs with a predictor (`kv_connector_extra_config: {"predictor": "kvswap", ...}`):
- `do_kv_cache_update` does not write vLLM's paged buffer (whose pages are then never touched:
  the connector maps it lazily, so the logical pool costs no memory);
- `forward` appends each request's new K/V to its sequence; a prefill chunk attends densely to
  everything so far (read back from the disk tier one layer at a time), a decode token to the
  groups its own query selects (loaded into the hot tier, reusing resident ones) plus the tail.
A request is recognised by its first block id; its sequence starts when its context is 0
tokens and is released when the scheduler finishes or preempts it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.predict.adapter import adapter_for
from kvswap_vllm.predict.base import ModelShape, SelectionConfig
from kvswap_vllm.runtime.sequence import DiskRuntimeConfig, KVSwapSequence
from kvswap_vllm.store import DiskStore, StoreConfig
from kvswap_vllm.store.profiles import get_profile

log = logging.getLogger("vllm.kvswap")
# Where the worker writes its memory peaks when it shuts down (benchmarks set it).
STATS_ENV = "KVSWAP_STATS_FILE"
# Query rows per dense prefill attention call: bounds the score matrix (rows x context x heads).
PREFILL_QUERY_BLOCK = 256


class SparseRuntime:
    """The worker's KVSwap sequences, keyed by each request's first vLLM block id."""

    def __init__(self, store, shape, config: DiskRuntimeConfig, adapter: object | None) -> None:
        self.store, self.shape, self.config, self.adapter = store, shape, config, adapter
        self._seqs: dict[int, KVSwapSequence] = {}
        self.steps = 0
        # Peak over steps of what the live sequences hold in memory (hot tier, metadata, tails).
        self.peak = {"kv_memory_bytes": 0, "hot_tier_bytes": 0, "metadata_bytes": 0, "tail_bytes": 0, "sequences": 0}

    def release(self, keys: list[int]) -> None:
        for key in keys:
            seq = self._seqs.pop(key, None)
            if seq is not None:
                seq.close()

    def _sequence(self, key: int, context: int, layer: int) -> KVSwapSequence:
        seq = self._seqs.get(key)
        if context == 0 and layer == 0:  # a request's first chunk: a fresh sequence
            if seq is not None:
                seq.close()
            seq = self._seqs[key] = KVSwapSequence(self.store, self.shape, self.config, self.adapter)
        if seq is None or seq.length(layer) != context:
            raise RuntimeError(f"kvswap: request with first block {key} has {context} tokens of context "
                               f"at layer {layer}, but its KVSwap sequence holds "
                               f"{None if seq is None else seq.length(layer)}")
        return seq

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               meta: Any, output: torch.Tensor, scale: float, released: list[int] = ()) -> torch.Tensor:
        """query (T, Hq, D), key/value (T, Hkv, D) for the batch's T new tokens; fills output."""
        if layer == 0:
            self.steps += 1
            self.release(released)
            self._track_memory()
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        first_blocks = meta.block_table[:, 0].tolist()
        out = output[:meta.num_actual_tokens].view(-1, self.shape.num_q_heads, self.shape.head_dim)
        for i in range(len(seq_lens)):
            s, e = starts[i], starts[i + 1]
            if e == s:
                continue
            context = seq_lens[i] - (e - s)
            seq = self._sequence(first_blocks[i], context, layer)
            q, k, v = query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1)
            if e - s == 1 and context > 0:
                kk, vv = seq.decode_kv(layer, k, v, q[:, 0])
                o = F.scaled_dot_product_attention(q, kk, vv, scale=scale, enable_gqa=True)
            else:
                kk, vv = seq.prefill_kv(layer, k, v)
                o = _causal_attention(q, kk, vv, context, scale)
            out[s:e] = o.transpose(0, 1)
        return output

    def _track_memory(self) -> None:
        now = {"hot_tier_bytes": sum(s.hot.nbytes for s in self._seqs.values()),
               "metadata_bytes": sum(s.predictor.metadata_bytes() for s in self._seqs.values()),
               "tail_bytes": sum(s.tail_bytes() for s in self._seqs.values()), "sequences": len(self._seqs)}
        now["kv_memory_bytes"] = now["hot_tier_bytes"] + now["metadata_bytes"] + now["tail_bytes"]
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)

    def close(self) -> None:
        self._track_memory()
        path = os.environ.get(STATS_ENV)
        if path:  # benchmarks read what the worker process held
            Path(path).write_text(json.dumps({"peak": self.peak, "steps": self.steps, "store": self.store.stats.as_dict()}))
        self.release(list(self._seqs))
        self.store.close()


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
    budget = mc.max_model_len if options.predictor == "dense" else options.budget_tokens
    selection = SelectionConfig(budget_tokens=budget, group_size=options.group_size)
    adapter = adapter_for(options.predictor, identity.model_fingerprint, shape.head_dim)
    store = DiskStore(StoreConfig(
        root=options.root, model_fingerprint=identity.model_fingerprint, num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, group_size=options.group_size,
        dtype=identity.dtype, tenant=f"{options.tenant}.kvswap", direct_io=options.direct_io,
        **get_profile(options.storage_profile).store_settings()))
    log.info("kvswap: KVSwap decoding in vLLM: predictor %s, M=%d tokens, G=%d, disk tier %s",
             options.predictor, budget, options.group_size, store.config.namespace)
    return SparseRuntime(store, shape, DiskRuntimeConfig(selection, options.predictor), adapter)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    """Query i (at position offset + i) attends to keys 0..offset + i; in row blocks."""
    out = torch.empty_like(q)
    pos_k = torch.arange(k.shape[1])
    for r in range(0, q.shape[1], PREFILL_QUERY_BLOCK):
        rows = slice(r, min(r + PREFILL_QUERY_BLOCK, q.shape[1]))
        pos_q = torch.arange(rows.start, rows.stop) + offset
        mask = pos_k[None, :] <= pos_q[:, None]
        out[:, rows] = F.scaled_dot_product_attention(q[:, rows], k, v, attn_mask=mask, scale=scale,
                                                      enable_gqa=True)
    return out


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
                                  attn_metadata, output, self.scale, meta.released)

    def _decoder(self) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return self.attn_type == AttentionType.DECODER


class KVSwapCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[KVSwapCPUAttentionImpl]:
        return KVSwapCPUAttentionImpl
