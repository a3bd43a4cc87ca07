"""Layer-ahead query prediction inside vLLM's model, as the KVSwap paper does it: before layer
L's attention block runs, its normalised input times layer L+1's W_q (then RoPE) predicts layer
L+1's decode queries, whose groups start loading while layer L computes.

vLLM's attention layers only see q, k and v, so the prediction hooks the attention *blocks*
(the modules owning `qkv_proj`, `rotary_emb` and the `attn` layer: Llama, Qwen2, Qwen3). They
are found on the engine's first forward pass (its warm-up) by a global module hook that then
removes itself. Hooks need eager execution: a compiled model (no `enforce_eager`) keeps
selecting from each layer's own query, which is exact but loads on the critical path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from kvswap_vllm.runtime.sequence import FIRST_AHEAD_LAYER

if TYPE_CHECKING:
    from kvswap_vllm.vllm.sparse_attention import SparseRuntime

log = logging.getLogger("vllm.kvswap")


def predicted_query(block: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The queries `block` would compute from `hidden` (tokens, hidden_size), post-RoPE:
    (tokens, num_q_heads, head_dim). With the previous layer's input: the layer-ahead estimate."""
    qkv, _ = block.qkv_proj(hidden)
    q = qkv[:, :block.q_size].contiguous()
    if hasattr(block, "q_norm"):  # Qwen3 normalises each head before RoPE
        q = block.q_norm(q.view(q.shape[0], -1, block.head_dim)).reshape(q.shape)
    # vLLM's CPU RoPE works in place on q and k; a scratch key keeps the call uniform.
    key = torch.zeros(q.shape[0], block.kv_size, dtype=q.dtype)
    q, _ = block.rotary_emb(positions, q, key)
    return q.view(q.shape[0], -1, block.head_dim)


class LayerAhead:
    """Finds the model's attention blocks and predicts each next layer's decode queries."""

    def __init__(self, runtime: "SparseRuntime", num_layers: int) -> None:
        self.runtime, self.num_layers = runtime, num_layers
        self.blocks: dict[int, nn.Module] = {}
        self._hooks: list[Any] = []
        self._finder = register_module_forward_pre_hook(self._find)

    def _find(self, module: nn.Module, args: Any) -> None:
        name = getattr(getattr(module, "attn", None), "layer_name", None)
        if not isinstance(name, str) or not all(hasattr(module, a) for a in ("qkv_proj", "rotary_emb", "q_size")):
            return
        from vllm.model_executor.models.utils import extract_layer_index

        layer = extract_layer_index(name)
        if layer not in self.blocks:
            self.blocks[layer] = module
            self._hooks.append(module.register_forward_pre_hook(self._make_hook(layer), with_kwargs=True))
        if len(self.blocks) == self.num_layers:
            self._finder.remove()
            log.info("kvswap: layer-ahead prediction hooked into %d attention blocks", self.num_layers)

    def _make_hook(self, layer: int):
        target = layer + 1
        if target < FIRST_AHEAD_LAYER or target >= self.num_layers:
            return lambda module, args, kwargs: None

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            block = self.blocks.get(target)
            if block is None:
                return
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
            positions = kwargs["positions"] if "positions" in kwargs else args[0]
            self.runtime.submit_ahead(target, module.attn.layer_name,
                                      lambda rows: predicted_query(block, hidden[rows], positions[rows]))

        return hook

    def close(self) -> None:
        self._finder.remove()
        for h in self._hooks:
            h.remove()
