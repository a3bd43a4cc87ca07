"""Low-rank key predictors (KVSwap). Both keep `rank` numbers per token per layer.

- JointLowRank ("kvswap-paper", as published): keys of all KV heads concatenated, projected
  on the joint basis A (H*d, r); the query is averaged within each GQA group, each KV head's
  part projected through its (d, r) slice of A and averaged over heads: one score per token.
- PerHeadLowRank ("kvswap"): each KV head projected on its own basis (d, r/H); each query
  head scored in its KV head's space and turned into an estimated attention distribution
  (softmax over tokens); a group's score is its estimated attention mass, summed over heads.
The paper's group score is the max over its tokens.
"""

from __future__ import annotations

import torch

from kvswap_vllm.predict.base import Predictor


class _LowRank(Predictor):
    needs_adapter = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lr: list[list[torch.Tensor]] = [[] for _ in range(self.shape.num_layers)]

    def _keys(self, layer: int) -> torch.Tensor:
        lr = torch.cat(self._lr[layer])
        self._lr[layer] = [lr]
        return lr

    def metadata_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._lr for t in ts)

    def _group_max(self, token_scores: torch.Tensor) -> torch.Tensor:
        return token_scores.view(-1, self.selection.group_size).amax(dim=1)


class JointLowRank(_LowRank):
    name = "kvswap-paper"

    def _append(self, layer: int, keys: torch.Tensor) -> None:
        flat = keys.reshape(-1, self.shape.num_kv_heads * self.shape.head_dim).float()
        self._lr[layer].append(flat @ self.adapter.joint[layer])  # (tokens, r)

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        s = self.shape
        q = query.float().view(s.num_kv_heads, s.gqa, s.head_dim).mean(dim=1)  # GQA-averaged (H, d)
        a = self.adapter.joint[layer].view(s.num_kv_heads, s.head_dim, -1)  # per-head slices (H, d, r)
        q_lr = torch.einsum("hd,hdr->r", q, a) / s.num_kv_heads
        return self._group_max(self._keys(layer) @ q_lr)


class PerHeadLowRank(_LowRank):
    name = "kvswap"

    def _append(self, layer: int, keys: torch.Tensor) -> None:
        k = keys.reshape(-1, self.shape.num_kv_heads, self.shape.head_dim).float()
        self._lr[layer].append(torch.einsum("thd,hdr->thr", k, self.adapter.per_head[layer]))  # (tokens, H, r_h)

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        s = self.shape
        q = query.float().view(s.num_kv_heads, s.gqa, s.head_dim)
        q_lr = torch.einsum("hgd,hdr->hgr", q, self.adapter.per_head[layer])  # (H, gqa, r_h)
        logits = torch.einsum("thr,hgr->thg", self._keys(layer), q_lr).flatten(1) * s.head_dim**-0.5
        # Per query head, an estimate of its attention distribution; a token's score is the
        # estimated attention mass it gets, summed over heads (heads with peaky logits do not
        # drown the others, as a plain max over raw logits lets them).
        mass = torch.softmax(logits, dim=0).sum(dim=1)
        return mass.view(-1, self.selection.group_size).sum(dim=1)  # the group's estimated mass
