"""Exact attention over keys that arrive in blocks: each block's softmax output is merged with
the others through their log-sum-exps, so a long past never has to be in memory at once.

softmax over [A, B] of q.k, applied to V, equals
    o_A * exp(lse_A - lse) + o_B * exp(lse_B - lse),   lse = logaddexp(lse_A, lse_B)
where o_X is the attention output over block X alone and lse_X the log-sum-exp of its scaled
scores. A chunked prefill attends to the disk tier one block at a time this way.
Tensors are (heads, tokens, head_dim); key/value heads may be fewer than query heads (GQA).
"""

from __future__ import annotations

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over one block, and the log-sum-exp of each query's scaled
    scores (Hq, Tq), float32. `causal`: query i sees keys 0..i (q and k the same tokens)."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal block needs as many keys as queries, got {q.shape[1]} and {k.shape[1]}")
    if q.device.type == "cpu":
        # PyTorch's CPU flash kernel returns the log-sum-exp beside the output and never
        # materialises the (Tq, Tk) scores; it takes fewer KV heads than query heads (GQA).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, scale=scale)
        return out[0], lse[0]
    return _math_attention_with_lse(q, k, v, scale, causal)


def _math_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, written out (any device): the block's scores are materialised, so blocks bound
    its memory."""
    hq, tq, d = q.shape
    hk, tk = k.shape[0], k.shape[1]
    scores = (q.float().reshape(hk, hq // hk * tq, d) @ k.float().transpose(1, 2)) * scale
    if causal:
        hidden = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        scores.view(hk, hq // hk, tq, tk).masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ v.float()
    return out.view(hq, tq, d).to(q.dtype), lse.view(hq, tq)


class BlockwiseSoftmax:
    """Running merge of attention outputs over disjoint key blocks of the same queries."""

    def __init__(self) -> None:
        self._out: torch.Tensor | None = None  # float32 (Hq, Tq, d)
        self._lse: torch.Tensor | None = None  # (Hq, Tq)

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """One block's attention output and log-sum-exp (attention_with_lse)."""
        if self._out is None:
            self._out, self._lse = out.float(), lse.float()
            return
        merged = torch.logaddexp(self._lse, lse)
        self._out.mul_(torch.exp(self._lse - merged).unsqueeze(-1))
        self._out.add_(out.float() * torch.exp(lse - merged).unsqueeze(-1))
        self._lse = merged

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self._out is None:
            raise ValueError("no key block was added")
        return self._out.to(dtype)
