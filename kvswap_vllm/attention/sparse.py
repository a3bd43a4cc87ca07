"""Which token positions a sparse decode step attends to, and gathering their K/V."""

from __future__ import annotations

import torch


def selected_positions(groups: torch.Tensor, group_size: int, tail_start: int, total_tokens: int) -> torch.Tensor:
    """Token positions of the selected groups (ascending ids) followed by the tail.

    groups: (k,) int64 ids of groups below `tail_start`; the tail is [tail_start, total_tokens),
    the tokens not yet in any recorded group (always attended, the current token among them).
    Returns (k * group_size + tail,) int64, ascending.
    """
    within = torch.arange(group_size)
    picked = (groups.view(-1, 1) * group_size + within).flatten()
    return torch.cat([picked, torch.arange(tail_start, total_tokens)])


def gather_kv(key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key/value: (batch, kv_heads, tokens, head_dim) -> the same at `positions` only."""
    return key.index_select(2, positions), value.index_select(2, positions)


def attention_mass(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, scaling: float) -> float:
    """Share of the true softmax attention mass that falls on `positions`, averaged over heads.

    query: (num_q_heads, head_dim); key: (kv_heads, tokens, head_dim).
    """
    gqa = query.shape[0] // key.shape[0]
    k = key.repeat_interleave(gqa, dim=0)  # (q_heads, tokens, d)
    probs = torch.softmax(torch.einsum("hd,htd->ht", query.float(), k.float()) * scaling, dim=-1)
    return float(probs[:, positions].sum(dim=-1).mean())
