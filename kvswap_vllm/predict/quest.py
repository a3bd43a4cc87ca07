"""Quest: per group, per KV head, the elementwise min and max of its keys; a query's upper
bound on q.k within the group is sum_d max(q_d * min_d, q_d * max_d). Max over query heads."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvswap_vllm.predict.base import Predictor, RowBuffer


class Quest(Predictor):
    name = "quest"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Per layer: (num_groups, num_kv_heads, head_dim) each.
        self._min = [RowBuffer() for _ in range(self.shape.num_layers)]
        self._max = [RowBuffer() for _ in range(self.shape.num_layers)]

    def group_metadata(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([keys.amin(dim=1), keys.amax(dim=1)], dim=1).float()  # (groups, 2, H, d)

    def _store(self, layer: int, rows: torch.Tensor) -> None:
        self._min[layer].append(rows[:, 0])
        self._max[layer].append(rows[:, 1])

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        lo, hi = self._min[layer].view(), self._max[layer].view()
        q = query.float().view(self.shape.num_kv_heads, self.shape.gqa, 1, -1)  # (H, gqa, 1, d)
        bound = torch.maximum(q * lo.transpose(0, 1).unsqueeze(1), q * hi.transpose(0, 1).unsqueeze(1)).sum(-1)
        return bound.amax(dim=(0, 1))  # (H, gqa, groups) -> (groups,)

    def _buffers(self) -> Iterable[tuple[RowBuffer, int]]:
        return ((buf, 1) for buf in (*self._min, *self._max))
