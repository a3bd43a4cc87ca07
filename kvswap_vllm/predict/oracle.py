"""Oracle: `kvswap`'s scoring with the exact keys instead of their low-rank projection.

Its metadata is the whole K of every full group (float32), so it saves no memory and is not
meant for serving: it measures the ceiling of this selection rule. Per query head the exact
attention distribution over the full groups, a group's score its mass summed over heads; the
gap between `oracle` and `kvswap` at the same budget is what the low-rank keys cost, and the gap
between `oracle` and `dense` what head-shared, group-granular selection at that budget costs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvswap_vllm.predict.base import Predictor, RowBuffer


class ExactKeys(Predictor):
    name = "oracle"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keys = [RowBuffer() for _ in range(self.shape.num_layers)]  # (tokens, H, d) float32 per layer

    def group_metadata(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        return keys.float().contiguous()  # (groups, G, H, d)

    def _store(self, layer: int, rows: torch.Tensor) -> None:
        self._keys[layer].append(rows.reshape(-1, self.shape.num_kv_heads, self.shape.head_dim))

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        keys = self._keys[layer].view()
        s, g = self.shape, self.selection.group_size
        q = query.float().view(s.num_kv_heads, s.gqa, s.head_dim)
        logits = torch.bmm(q, keys.permute(1, 2, 0)) * s.head_dim**-0.5  # (H, gqa, tokens)
        mass = torch.softmax(logits, dim=-1).sum(dim=(0, 1))
        return mass.view(-1, g).sum(dim=1)

    def _buffers(self) -> Iterable[tuple[RowBuffer, int]]:
        return ((buf, self.selection.group_size) for buf in self._keys)
