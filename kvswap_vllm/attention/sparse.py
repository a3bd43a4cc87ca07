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


def decode_over_parts(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """One query token, q (Hq, 1, D), attending to the keys and values of all `parts` together
    (each (Hkv, T_i, D): the selected groups, the tail), as if they were one tensor, without the
    copy that would join them: the scores are joined (a few hundred numbers per head), the
    weighted values summed per part. The query heads of a KV head are batched together
    (torch's SDPA with enable_gqa takes ~1 ms here on CPU, this ~60 us)."""
    hq, hkv = q.shape[0], parts[0][0].shape[0]
    qq = q.reshape(hkv, hq // hkv, q.shape[-1])
    scores = [torch.bmm(qq, k.transpose(1, 2)) for k, _ in parts]
    probs = torch.softmax(torch.cat(scores, dim=-1) * scale, dim=-1)
    out, at = None, 0
    for (k, v), part in zip(parts, scores):
        o = torch.bmm(probs[..., at:at + part.shape[-1]], v)
        out, at = o if out is None else out.add_(o), at + part.shape[-1]
    return out.view(hq, 1, -1)
