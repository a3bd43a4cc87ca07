"""KVSwap on a Hugging Face model with the KV cache on disk.

Per layer, memory holds only: the low-rank metadata (in the predictor), M/G hot-tier slots,
and a rolling tail of the newest tokens. Everything else is in the disk tier:
- prefill runs in chunks; each chunk attends densely to the previous tokens, read back from
  the disk tier one layer at a time (memory bounded by one layer's KV), and its full groups
  are written to the disk tier as it goes;
- decode: inside layer L the next layer's query is predicted (layer-ahead), its groups are
  selected and their loads submitted; layer L+1 waits only for its own reads, then attends to
  its hot-tier slots plus the tail. Layers 0 and 1 select from their own query, synchronously.
One sequence at a time (batch 1); `generate` runs a batch of prompts one after another.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvswap_vllm.hot.tier import HotTier
from kvswap_vllm.predict.base import Predictor, SelectionConfig, create_predictor
from kvswap_vllm.prefetch.pipeline import LayerPrefetcher
from kvswap_vllm.runtime.hf_kvswap import layer_query, model_shape, register_attention
from kvswap_vllm.store.disk_store import DiskStore
from kvswap_vllm.store.fileio import aligned_tensor

ATTENTION_NAME = "kvswap_disk"


@dataclass(frozen=True)
class DiskRuntimeConfig:
    """Settings of the disk-backed runtime."""

    selection: SelectionConfig
    predictor: str = "kvswap"
    # Newest groups kept in memory before they go to disk as one file (the rolling tail).
    flush_groups: int = 16
    # Prefill chunk, tokens: bounds prefill memory.
    prefill_chunk: int = 1024


class _Layer(DynamicLayer):
    """One layer's in-memory part: the tail; the rest is in the disk tier."""

    def __init__(self, seq: "DiskSequence", layer: int) -> None:
        super().__init__()
        self.seq, self.layer = seq, layer
        self.disk_groups = 0
        self.keys = self.values = None  # the tail, (1, H, t, d)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        seq, g = self.seq, self.seq.group_size
        if key_states.shape[2] == 1:
            # Decode: this step attends to the whole tail (the new token included); a tail that
            # is now full goes to disk right after, so that the next step's layer-ahead
            # selections (made before this layer's next update) can already pick its groups.
            self._append(key_states, value_states)
            k, v = self.keys, self.values
            if k.shape[2] >= g * seq.config.flush_groups:
                self._flush(k.shape[2] // g * g)
            return k, v
        past_k, past_v = seq.read_layer(self.layer, self.disk_groups)
        self._append(key_states, value_states)
        full_k = torch.cat([past_k, self.keys], dim=2) if past_k is not None else self.keys
        full_v = torch.cat([past_v, self.values], dim=2) if past_v is not None else self.values
        self._flush(self.keys.shape[2] // g * g)
        return full_k, full_v

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)

    def _flush(self, tokens: int) -> None:
        """Write the first `tokens` tail tokens (whole groups) to disk, metadata to the predictor."""
        if tokens <= 0:
            return
        g = self.seq.group_size
        k, v = self.keys[0, :, :tokens], self.values[0, :, :tokens]  # (H, T, d)
        h, d, n = k.shape[0], k.shape[-1], tokens // g
        # One copy into the store's layout (n, H, 2, G, d), in page-aligned memory, which the
        # store then writes to disk without another copy.
        groups = aligned_tensor((n, h, 2, g, d), k.dtype)
        groups[:, :, 0] = k.reshape(h, n, g, d).transpose(0, 1)
        groups[:, :, 1] = v.reshape(h, n, g, d).transpose(0, 1)
        self.seq.write_groups(self.layer, self.disk_groups, groups, k.transpose(0, 1))
        self.disk_groups += tokens // g
        self.keys, self.values = self.keys[:, :, tokens:], self.values[:, :, tokens:]

    def get_seq_length(self) -> int:
        tail = 0 if self.keys is None else self.keys.shape[2]
        return self.disk_groups * self.seq.group_size + tail

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def lazy_initialization(self, key_states, value_states) -> None:
        pass


class DiskSequence(Cache):
    """The HF cache of one sequence whose KV lives in the disk tier."""

    def __init__(self, runtime: "KVSwapDisk") -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.group_size = runtime.config.selection.group_size
        self.name = f"seq-{uuid.uuid4().hex[:12]}"
        self.store: DiskStore = runtime.store
        self.store.open_sequence(self.name, private=True)
        n = runtime.shape.num_layers
        self.predictor: Predictor = create_predictor(self.config.predictor, runtime.shape, self.config.selection,
                                                     runtime.adapter)
        self.hot = HotTier(self.store, self.name, self.config.selection.budget_groups)
        self.prefetch = LayerPrefetcher(self.hot)
        super().__init__(layers=[_Layer(self, i) for i in range(n)])

    def read_layer(self, layer: int, groups: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """All `groups` stored groups of `layer` as (1, H, groups*G, d) K and V (prefill)."""
        if groups == 0:
            return None, None
        self.store.flush()
        res = self.store.read_groups(self.name, layer, range(groups))
        if not res.found.all():
            raise RuntimeError(f"disk tier lost groups of layer {layer} during prefill")
        kv = res.kv  # (n, H, 2, G, d)
        n, h, _, g, d = kv.shape
        k = kv[:, :, 0].permute(1, 0, 2, 3).reshape(1, h, n * g, d)
        v = kv[:, :, 1].permute(1, 0, 2, 3).reshape(1, h, n * g, d)
        return k, v

    def write_groups(self, layer: int, first: int, groups: torch.Tensor, keys: torch.Tensor) -> None:
        if not self.store.write_groups_async(self.name, layer, first, groups).result():
            raise RuntimeError("the disk tier refused a write (capacity or disk full)")
        g = self.group_size
        self.predictor.append_groups(layer, keys.reshape(-1, g, *keys.shape[1:]))

    def close(self) -> None:
        self.prefetch.close()
        self.store.release_sequence(self.name)


class KVSwapDisk:
    """Installs disk-backed KVSwap decoding into `model`."""

    def __init__(self, model, store: DiskStore, config: DiskRuntimeConfig, adapter=None) -> None:
        self.model, self.store, self.config, self.adapter = model, store, config, adapter
        self.shape = model_shape(model.config)
        self.current: DiskSequence | None = None
        register_attention(ATTENTION_NAME, _attention)
        self._attn = [layer.self_attn for layer in model.model.layers]
        for i, attn in enumerate(self._attn):
            attn._kvswap_disk = self
            attn.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
        for module in model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = ATTENTION_NAME

    def new_sequence(self) -> DiskSequence:
        if self.current is not None:
            self.current.close()
        self.current = DiskSequence(self)
        return self.current

    def _make_hook(self, layer: int):
        """Before layer L runs (and before its cache update): layers 0 and 1 select from their
        own query; layer L also selects for L+1 from L's input and L+1's W_q (layer-ahead)."""

        def hook(module, args, kwargs):
            seq = self.current
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if seq is None or hidden is None or hidden.shape[1] != 1:
                return None
            cos, sin = kwargs["position_embeddings"]
            for target in (layer, layer + 1):
                ahead = target == layer + 1
                if target >= self.shape.num_layers or (ahead and target < 2) or (not ahead and target >= 2):
                    continue
                q = layer_query(self._attn[target], hidden, cos, sin, self.shape.head_dim)
                seq.prefetch.submit(target, seq.predictor.select(target, q), ahead=ahead)
            return None

        return hook



def _attention(module, query, key, value, attention_mask, **kwargs):
    rt: KVSwapDisk = module._kvswap_disk
    if key.shape[0] != 1:
        raise ValueError("the disk-backed KVSwap runtime decodes one sequence at a time (batch 1)")
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    seq, layer = rt.current, module.layer_idx
    res = seq.prefetch.wait(layer)
    if res.unavailable:
        raise RuntimeError(f"layer {layer}: groups {res.unavailable[:5]} are not in the disk tier")
    hk, hv = seq.hot.gather(layer, res.slots)
    k = torch.cat([hk.unsqueeze(0), key], dim=2)
    v = torch.cat([hv.unsqueeze(0), value], dim=2)
    return sdpa_attention_forward(module, query, k, v, None, **kwargs)


@torch.inference_mode()
def generate(model, runtime: KVSwapDisk, prompt: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], dict]:
    """Greedy generation of one prompt with the KV cache on disk; (tokens, timings)."""
    seq = runtime.new_sequence()
    ids = torch.tensor([prompt])
    chunk = runtime.config.prefill_chunk
    t0 = time.perf_counter()
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start:start + chunk], past_key_values=seq, use_cache=True)
    t_first = time.perf_counter()
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=seq, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    t_last = time.perf_counter()
    info = {"ttft_s": t_first - t0, "decode_s": t_last - t_first, "reuse_rate": seq.hot.stats.reuse_rate,
            "bytes_read": seq.hot.stats.bytes_read, "hot_tier_bytes": seq.hot.nbytes,
            "metadata_bytes": seq.predictor.metadata_bytes(), "prefetch_overlap": seq.prefetch.stats.overlap,
            "prefetched_loads": seq.prefetch.stats.ahead, "synchronous_loads": seq.prefetch.stats.synchronous}
    return tokens, info
