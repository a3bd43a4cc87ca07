"""Sinks + recent window (StreamingLLM-style): no metadata, position only."""

from __future__ import annotations

import torch

from kvswap_vllm.predict.base import Predictor

SINK_TOKENS = 4


class SinkWindow(Predictor):
    name = "window"

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        n = self.num_groups(layer)
        scores = torch.arange(n, dtype=torch.float32)  # newer is better
        sinks = -(-SINK_TOKENS // self.selection.group_size)
        scores[:sinks] = float("inf")
        return scores
