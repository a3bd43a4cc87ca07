"""The HF reference runtime: sparse decode equals dense when the budget covers everything,
and really restricts attention when it does not (tiny random Llama built on the fly)."""

from __future__ import annotations

import copy

import pytest
import torch

from kvswap_vllm.predict.base import PREDICTORS, SelectionConfig
from kvswap_vllm.runtime.hf_kvswap import KVSwapReference, model_shape
from tests.helpers import with_value_bases


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def adapter_for(model) -> object:
    from kvswap_vllm.predict.adapter import LowRankAdapter, _bases

    shape = model_shape(model.config)
    g = torch.Generator().manual_seed(0)
    bases = [_bases(torch.randn(128, shape.num_kv_heads, shape.head_dim, generator=g), 8)
             for _ in range(shape.num_layers)]
    return with_value_bases(LowRankAdapter("ab" * 16, shape.num_kv_heads, shape.head_dim, 8,
                                           tuple(b[0] for b in bases), tuple(b[1] for b in bases)))


@torch.inference_mode()
def greedy_logits(model, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    out = model(input_ids=prompt, use_cache=True)
    past, logits = out.past_key_values, [out.logits[0, -1]]
    for _ in range(steps):
        out = model(input_ids=logits[-1].argmax().view(1, 1), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1])
    return logits


PROMPT = torch.randint(0, 128, (1, 61), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("flush_groups", [1, 16])
@pytest.mark.parametrize("name", list(PREDICTORS))
def test_full_budget_is_bit_identical_to_dense(name: str, flush_groups: int) -> None:
    dense = tiny_llama()
    sparse = copy.deepcopy(dense)
    ref = KVSwapReference(sparse, name, SelectionConfig(budget_tokens=4096, group_size=4), adapter_for(sparse),
                          flush_groups=flush_groups)
    ref.start_sequence()
    a, b = greedy_logits(dense, PROMPT, 12), greedy_logits(sparse, PROMPT, 12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Decoded tokens become selectable groups once the tail holds flush_groups groups (the
    # prompt's 15 whole groups at once).
    assert ref.stats.steps == 12 and ref.predictor.num_groups(0) == ((61 + 12 - 1) // 4 if flush_groups == 1 else 15)


@pytest.mark.parametrize("name", ["kvswap", "kvswap-paper", "quest", "window"])
def test_small_budget_restricts_attention(name: str) -> None:
    dense = tiny_llama()
    sparse = copy.deepcopy(dense)
    sel = SelectionConfig(budget_tokens=8, group_size=4)
    ref = KVSwapReference(sparse, name, sel, adapter_for(sparse), measure_recall=True, flush_groups=1)
    ref.start_sequence()
    a, b = greedy_logits(dense, PROMPT, 6), greedy_logits(sparse, PROMPT, 6)
    assert torch.equal(a[0], b[0])  # prefill stays dense
    assert not torch.equal(a[1], b[1])
    layers = ref.shape.num_layers
    # Each step attends to 2 groups plus a tail of 1-4 tokens, never the whole context.
    assert ref.stats.selected_tokens <= 6 * layers * (8 + 4)
    assert all(0.0 < r < 1.0 for r in ref.stats.recall())


def test_batch_of_two_is_refused() -> None:
    model = tiny_llama()
    ref = KVSwapReference(model, "dense", SelectionConfig(), None)
    ref.start_sequence()
    with pytest.raises(ValueError, match="one sequence at a time"):
        model(input_ids=PROMPT.repeat(2, 1))


def test_layer_query_is_the_query_attention_computes() -> None:
    """The selection's query (RoPE as one product with a per-step rotation matrix) matches what
    HF's attention rotates, at several positions; the matrix is rebuilt for a new position."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvswap_vllm.runtime.hf_kvswap import layer_query

    model = tiny_llama()
    attn, d = model.model.layers[1].self_attn, model.config.head_dim
    hidden = torch.randn(1, 1, model.config.hidden_size)
    for pos in (0, 7, 300):
        cos, sin = model.model.rotary_emb(hidden, torch.tensor([[pos]]))
        q = attn.q_proj(hidden).view(1, 1, -1, d).transpose(1, 2)  # (1, Hq, 1, d)
        want, _ = apply_rotary_pos_emb(q, q, cos, sin)
        got = layer_query(attn, hidden, cos, sin, d)
        assert got.shape == (model.config.num_attention_heads, d)
        torch.testing.assert_close(got, want[0, :, -1], rtol=1e-6, atol=1e-6)
