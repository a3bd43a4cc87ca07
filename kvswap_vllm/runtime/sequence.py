"""One sequence's KV cache in the disk tier, decoded with KVSwap; engine-neutral.

Per layer, memory holds only the low-rank metadata (in the predictor), the hot tier's M/G slots
and a rolling tail of the newest tokens; every full group is in the disk tier. Tensors are
(num_kv_heads, tokens, head_dim). The HF runtime (runtime/hf_disk.py) and the vLLM attention
backend (vllm/sparse_attention.py) both drive this class.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from kvswap_vllm.hot.tier import HotTier
from kvswap_vllm.predict.base import ModelShape, Predictor, SelectionConfig, create_predictor
from kvswap_vllm.prefetch.pipeline import LayerPrefetcher
from kvswap_vllm.store.disk_store import DiskStore
from kvswap_vllm.store.fileio import aligned_tensor


@dataclass(frozen=True)
class DiskRuntimeConfig:
    """Settings of the disk-backed runtime."""

    selection: SelectionConfig
    predictor: str = "kvswap"
    # Newest groups kept in memory before they go to disk as one file (the rolling tail).
    flush_groups: int = 16
    # Prefill chunk, tokens: bounds prefill memory.
    prefill_chunk: int = 1024


class KVSwapSequence:
    """The KV of one sequence: disk groups + low-rank metadata + hot tier + tail, per layer."""

    def __init__(self, store: DiskStore, shape: ModelShape, config: DiskRuntimeConfig, adapter: object | None = None,
                 name: str | None = None) -> None:
        self.store, self.shape, self.config = store, shape, config
        self.group_size = config.selection.group_size
        self.name = name or f"seq-{uuid.uuid4().hex[:12]}"
        store.open_sequence(self.name, private=True)
        self.predictor: Predictor = create_predictor(config.predictor, shape, config.selection, adapter)
        self.hot = HotTier(store, self.name, config.selection.budget_groups)
        self.prefetch = LayerPrefetcher(self.hot)
        n = shape.num_layers
        self.disk_groups = [0] * n
        self._k: list[torch.Tensor | None] = [None] * n  # the tails
        self._v: list[torch.Tensor | None] = [None] * n
        self._submitted: set[int] = set()

    def length(self, layer: int) -> int:
        tail = 0 if self._k[layer] is None else self._k[layer].shape[1]
        return self.disk_groups[layer] * self.group_size + tail

    # ----- prefill: dense over everything so far --------------------------------------------
    def prefill_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chunk; returns K and V of the whole sequence (past read back from disk, one
        layer at a time) and writes the chunk's full groups to disk."""
        past_k, past_v = self._read_past(layer)
        self._append(layer, k, v)
        full_k = self._k[layer] if past_k is None else torch.cat([past_k, self._k[layer]], dim=1)
        full_v = self._v[layer] if past_v is None else torch.cat([past_v, self._v[layer]], dim=1)
        self._flush(layer, self._k[layer].shape[1] // self.group_size * self.group_size)
        return full_k, full_v

    def _read_past(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        groups = self.disk_groups[layer]
        if groups == 0:
            return None, None
        self.store.flush()
        res = self.store.read_groups(self.name, layer, range(groups))
        if not res.found.all():
            raise RuntimeError(f"disk tier lost groups of layer {layer} of {self.name} during prefill")
        n, h, _, g, d = res.kv.shape  # (n, H, 2, G, d)
        k = res.kv[:, :, 0].permute(1, 0, 2, 3).reshape(h, n * g, d)
        v = res.kv[:, :, 1].permute(1, 0, 2, 3).reshape(h, n * g, d)
        return k, v

    # ----- decode: selected groups + tail ---------------------------------------------------
    def submit(self, layer: int, query: torch.Tensor, ahead: bool) -> None:
        """Select `layer`'s groups for `query` (num_q_heads, head_dim), post-RoPE, and start
        loading the ones not resident; `ahead` = predicted from the previous layer."""
        self.prefetch.submit(layer, self.predictor.select(layer, query), ahead=ahead)
        self._submitted.add(layer)

    def decode_tail(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one step's token(s); returns the whole tail, new tokens included. A tail that is
        now full goes to disk right after, so the next step can already select its groups."""
        self._append(layer, k, v)
        tail_k, tail_v = self._k[layer], self._v[layer]
        if tail_k.shape[1] >= self.group_size * self.config.flush_groups:
            self._flush(layer, tail_k.shape[1] // self.group_size * self.group_size)
        return tail_k, tail_v

    def hot_kv(self, layer: int, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer`'s selected groups, (H, slots*G, d); selects from `query` now if
        nothing was submitted for this layer."""
        if layer not in self._submitted:
            if query is None:
                raise RuntimeError(f"layer {layer}: no selection submitted and no query given")
            self.submit(layer, query, ahead=False)
        self._submitted.discard(layer)
        res = self.prefetch.wait(layer)
        if res.unavailable:
            raise RuntimeError(f"layer {layer}: groups {res.unavailable[:5]} are not in the disk tier")
        return self.hot.gather(layer, res.slots)

    def decode_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                  query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of `layer`: K and V to attend to (selected groups, then the tail)."""
        hk, hv = self.hot_kv(layer, query)
        tail_k, tail_v = self.decode_tail(layer, k, v)
        return torch.cat([hk, tail_k], dim=1), torch.cat([hv, tail_v], dim=1)

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
        if not self.store.write_groups_async(self.name, layer, self.disk_groups[layer], groups).result():
            raise RuntimeError("the disk tier refused a write (capacity or disk full)")
        self.predictor.append_groups(layer, k.transpose(0, 1).reshape(n, g, h, d))
        self.disk_groups[layer] += n
        # Copies, not views: a view would keep the whole flushed chunk's storage alive.
        self._k[layer] = self._k[layer][:, tokens:].clone()
        self._v[layer] = self._v[layer][:, tokens:].clone()

    def tail_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)

    def stats(self) -> dict:
        return {"reuse_rate": self.hot.stats.reuse_rate, "bytes_read": self.hot.stats.bytes_read,
                "hot_tier_bytes": self.hot.nbytes, "metadata_bytes": self.predictor.metadata_bytes(),
                "prefetch_overlap": self.prefetch.stats.overlap, "prefetched_loads": self.prefetch.stats.ahead,
                "synchronous_loads": self.prefetch.stats.synchronous}

    def close(self) -> None:
        self.prefetch.close()
        self.store.release_sequence(self.name)
