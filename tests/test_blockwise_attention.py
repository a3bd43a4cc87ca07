"""Exact attention over key blocks merged by log-sum-exp (the chunked prefill's past)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvswap_vllm.attention import blockwise
from kvswap_vllm.attention.blockwise import BlockwiseSoftmax

IMPLS = {"cpu-kernel": blockwise.attention_with_lse, "math": blockwise._math_attention_with_lse}


def full_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries = the last q.shape[1] of the keys' tokens, each seeing everything up to itself."""
    tq, tk = q.shape[1], k.shape[1]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block", [7, 64, 1000])
def test_blocks_merge_to_full_attention(impl: str, dtype: torch.dtype, atol: float, block: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 40, 16, generator=gen).to(dtype)  # 6 query heads over 2 KV heads (GQA)
    k, v = (torch.randn(2, 240, 16, generator=gen).to(dtype) for _ in range(2))
    fn, past = IMPLS[impl], 200
    acc = BlockwiseSoftmax()
    acc.add(*fn(q, k[:, past:], v[:, past:], 0.25, causal=True))
    for s in range(0, past, block):
        acc.add(*fn(q, k[:, s:min(s + block, past)], v[:, s:min(s + block, past)], 0.25, causal=False))
    got = acc.result(dtype)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.allclose(got.float(), full_causal(q.float(), k.float(), v.float(), 0.25), atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_block_is_plain_attention_with_its_log_sum_exp(impl: str) -> None:
    q, k, v = torch.randn(4, 5, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    out, lse = IMPLS[impl](q, k, v, 0.5, causal=False)
    scores = torch.einsum("hqd,hkd->hqk", q, k.repeat_interleave(2, dim=0)) * 0.5
    assert torch.allclose(lse, torch.logsumexp(scores, dim=-1), atol=1e-5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.5, enable_gqa=True), atol=1e-5)


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="causal block needs as many keys as queries"):
        blockwise.attention_with_lse(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4), 1.0, True)
    with pytest.raises(ValueError, match="no key block"):
        BlockwiseSoftmax().result(torch.float32)
