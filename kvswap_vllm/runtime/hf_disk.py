"""KVSwap on a Hugging Face model with the KV cache on disk.

Per layer, memory holds only: the low-rank metadata (in the predictor), M/G hot-tier slots,
and a rolling tail of the newest tokens. Everything else is in the disk tier:
- prefill runs in chunks; each chunk attends densely to the previous tokens, read back from
  the disk tier one block at a time and merged exactly (memory bounded by one block, whatever
  the context), and its full groups are written to the disk tier as it goes;
- decode: inside layer L the next layer's query is predicted (layer-ahead), its groups are
  selected and their loads submitted; layer L+1 waits only for its own reads, then attends to
  its hot-tier slots plus the tail. Layers 0 and 1 select from their own query, synchronously.
One sequence at a time (batch 1); `generate` runs a batch of prompts one after another.
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvswap_vllm.predict.base import expected_tokens
from kvswap_vllm.resources import return_freed_memory_promptly, trim_heap
from kvswap_vllm.runtime.hf_kvswap import attend_decode, layer_query, model_shape, register_attention
from kvswap_vllm.runtime.sequence import DiskRuntimeConfig, KVSwapSequence
from kvswap_vllm.store.disk_store import DiskStore

ATTENTION_NAME = "kvswap_disk"
__all__ = ["DiskRuntimeConfig", "DiskSequence", "KVSwapDisk", "generate"]


class _Layer(DynamicLayer):
    """HF's per-layer cache interface over one layer of a KVSwapSequence (batch dim 1)."""

    def __init__(self, seq: "DiskSequence", layer: int) -> None:
        super().__init__()
        self.core, self.layer = seq.core, layer
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[2] != 1:  # prefill: _attention appends the chunk after attending to the past
            return key_states, value_states
        k, v = self.core.decode_tail(self.layer, key_states[0], value_states[0])  # _attention adds the selection
        return k.unsqueeze(0), v.unsqueeze(0)

    def get_seq_length(self) -> int:
        return self.core.length(self.layer)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def lazy_initialization(self, key_states, value_states) -> None:
        pass


class DiskSequence(Cache):
    """The HF cache of one sequence whose KV lives in the disk tier."""

    def __init__(self, runtime: "KVSwapDisk", expected_tokens: int = 0) -> None:
        self.core = KVSwapSequence(runtime.store, runtime.shape, runtime.config, runtime.adapter,
                                   device=runtime.model.device, expected_tokens=expected_tokens)
        super().__init__(layers=[_Layer(self, i) for i in range(runtime.shape.num_layers)])

    def close(self) -> None:
        self.core.close()


class KVSwapDisk:
    """Installs disk-backed KVSwap decoding into `model`."""

    def __init__(self, model, store: DiskStore, config: DiskRuntimeConfig, adapter=None) -> None:
        self.model, self.store, self.config, self.adapter = model, store, config, adapter
        self.shape = model_shape(model.config)
        self.current: DiskSequence | None = None
        # A chunked prefill's transients (activations, blocks of the past) must not stay as RSS.
        return_freed_memory_promptly()
        # No mask: _attention knows the chunk's causal structure (batch 1, no padding), and a
        # mask over the whole past would be a transient of chunk x context.
        register_attention(ATTENTION_NAME, _attention, mask=_no_mask)
        self._attn = [layer.self_attn for layer in model.model.layers]
        for i, attn in enumerate(self._attn):
            attn._kvswap_disk = self
            attn.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
        for module in model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = ATTENTION_NAME
        for layer in model.model.layers:
            layer.mlp.forward = _in_row_slices(layer.mlp.forward, MLP_SLICE_TOKENS)
        # A layer's own query is projected once: for its selection (in the hook), then its attention.
        self._q_proj = [_KeptOutput(attn.q_proj.forward) for attn in self._attn]
        for attn, kept in zip(self._attn, self._q_proj):
            attn.q_proj.forward = kept

    def new_sequence(self, expected_tokens: int = 0) -> DiskSequence:
        """A fresh sequence (closing the current one) that may reach `expected_tokens` tokens."""
        if self.current is not None:
            self.current.close()
        self.current = DiskSequence(self, expected_tokens)
        return self.current

    def _make_hook(self, layer: int):
        """Before layer L runs (and before its cache update, which may move the tail to disk):
        layer L selects from its own query (layers 0 and 1 always; later layers when the config
        re-selects, else they attend to their layer-ahead selection); then layer L selects for
        L+1 from L's input and L+1's W_q (layer-ahead). Before layer 0, the step's early
        prefetch starts every later layer's reads."""

        def hook(module, args, kwargs):
            seq = self.current
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if seq is None or hidden is None or hidden.shape[1] != 1:
                return None
            if layer == 0:
                seq.core.prefetch_step()
            cos, sin = kwargs["position_embeddings"]
            for target in (layer, layer + 1):
                ahead = target == layer + 1
                if target >= self.shape.num_layers or (ahead and (target < 2 or not self.config.prefetch)) or (
                        not ahead and not seq.core.needs_selection(target)):
                    continue
                # Only the layer's own input goes through its projection again, in its attention.
                q = layer_query(self._attn[target], hidden, cos, sin, self.shape.head_dim,
                                None if ahead else self._q_proj[target].keep)
                seq.core.submit(target, q, ahead=ahead)
            return None

        return hook


class _KeptOutput:
    """A module's forward that keeps its output for the input of the last `keep`: called again
    with that very tensor (the attention projecting the query the hook selected with, ~0.13 ms
    of weights read per layer and step on a CPU), it returns it instead of computing it twice."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        self._input, self._output = x, self.forward(x)
        return self._output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is self._input:
            out, self._input, self._output = self._output, None, None
            return out
        return self.forward(x)


#: Tokens of a prefill chunk the MLP runs at once: its intermediate activations (gate, up, their
#: product: 3 x tokens x intermediate_size floats, 19 MB at 1024 tokens on SmolLM2) are the
#: largest transient of a chunk; the attention needs the chunk whole, the MLP does not.
MLP_SLICE_TOKENS = 256


def _in_row_slices(forward, rows: int):
    """`forward` (token-wise, (batch, tokens, hidden) -> same shape) run `rows` tokens at a time
    into one output: the same result, with transients of `rows` tokens instead of all."""

    def sliced(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= rows:
            return forward(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[-2], rows):
            out[..., start:start + rows, :] = forward(x[..., start:start + rows, :])
        return out

    return sliced


def _no_mask(*args, **kwargs) -> None:
    return None


def _attention(module, query, key, value, attention_mask, **kwargs):
    rt: KVSwapDisk = module._kvswap_disk
    if key.shape[0] != 1:
        raise ValueError("the disk-backed KVSwap runtime decodes one sequence at a time (batch 1)")
    if query.shape[2] != 1:  # a prefill chunk: causal over itself, dense over the past (in blocks)
        scale = kwargs.get("scaling") or module.scaling
        out = rt.current.core.prefill_attention(module.layer_idx, query[0], key[0], value[0], scale)
        return out.transpose(0, 1).unsqueeze(0), None
    core, layer = rt.current.core, module.layer_idx
    hk, hv = core.hot_kv(layer, ordered=None)  # the slots as they lie where the order does not matter
    return attend_decode(module, query, (hk, key[0]), (hv, value[0]), core.rest(layer), **kwargs)


@torch.inference_mode()
def generate(model, runtime: KVSwapDisk, prompt: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], dict]:
    """Greedy generation of one prompt with the KV cache on disk; (tokens, timings)."""
    seq = runtime.new_sequence(expected_tokens(len(prompt), max_new_tokens))
    ids = torch.tensor([prompt], device=model.device)
    chunk = runtime.config.prefill_chunk
    t0 = time.perf_counter()
    for start in range(0, ids.shape[1], chunk):
        # Logits of the chunk's last token only: all of them would be chunk x vocab floats.
        out = model(input_ids=ids[:, start:start + chunk], past_key_values=seq, use_cache=True, logits_to_keep=1)
    trim_heap()  # the prefill's freed transients: decode allocates far less
    t_first = time.perf_counter()
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=model.device), past_key_values=seq, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    t_last = time.perf_counter()
    info = {"ttft_s": t_first - t0, "decode_s": t_last - t_first, **seq.core.stats()}
    return tokens, info
