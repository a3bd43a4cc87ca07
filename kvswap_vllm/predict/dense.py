"""Dense: every group, every step (exact attention; the quality reference)."""

from __future__ import annotations

import torch

from kvswap_vllm.predict.base import Predictor


class Dense(Predictor):
    name = "dense"
    selects_all = True

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_groups(layer))
