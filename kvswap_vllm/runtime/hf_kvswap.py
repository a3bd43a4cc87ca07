"""KVSwap decoding inside a Hugging Face model: dense prefill, sparse decode over the
groups a predictor selects plus the tail, with the paper's layer-ahead query prediction.

This is the quality reference (the full KV stays in the HF cache; only the selection is
applied), the same setting in which the KVSwap authors measured quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvswap_vllm.attention.sparse import KV, attention_mass, decode_attention, gather_kv, selected_positions
from kvswap_vllm.predict.base import ModelShape, Predictor, RestEstimate, SelectionConfig, create_predictor
from kvswap_vllm.runtime.sequence import DiskRuntimeConfig

ATTENTION_NAME = "kvswap_reference"


@dataclass
class StepStats:
    """Counters over the sparse decode steps since the last reset."""

    steps: int = 0
    # Per layer: sum of recall (attention mass inside the selection) and of reuse (share of
    # selected groups already selected at the previous step).
    recall_sum: list[float] = field(default_factory=list)
    reuse_sum: list[float] = field(default_factory=list)
    recall_steps: list[int] = field(default_factory=list)
    selected_tokens: int = 0
    # With reselect, per layer: sum of the share of the exact selection that the layer-ahead
    # prediction had already chosen (what its prefetch would have read), and the steps counted.
    ahead_hit_sum: list[float] = field(default_factory=list)
    ahead_steps: list[int] = field(default_factory=list)

    def recall(self) -> list[float]:
        return [s / n if n else float("nan") for s, n in zip(self.recall_sum, self.recall_steps)]

    def ahead_hit(self) -> float | None:
        """Share of the exact selections' groups the layer-ahead prediction had chosen."""
        steps = sum(self.ahead_steps)
        return sum(self.ahead_hit_sum) / steps if steps else None


def model_shape(config) -> ModelShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, head_dim)


def register_attention(name: str, fn, mask=sdpa_mask) -> None:
    """Register an attention function with its mask builder (default SDPA's): without the mask
    entry, transformers builds no causal mask for an unknown name, which breaks chunked prefill
    of an attention function that relies on it."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask)


def attend(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """HF's SDPA attention (transformers.integrations.sdpa_attention, decoder case) with the KV
    heads shared through SDPA's GQA instead of repeated per query head: the same numbers on the
    CPU (bit for bit, tested against HF's), without a copy of K/V per query head, which in a
    chunked prefill over 7k tokens is 32 MB per layer."""
    q_len = query.shape[2]
    causal = q_len > 1 and attention_mask is None and (getattr(module, "is_causal", True) if is_causal is None
                                                         else is_causal)
    if causal and key.shape[2] > q_len:  # as HF: SDPA's causal mask is aligned upper-left
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def attend_decode(module, query: torch.Tensor, key: KV, value: KV, rest: RestEstimate | None, **kwargs):
    """A decode step's attention over the selected K/V (batch 1): (1, H, T, d) each, or tuples
    of (H, T, d) blocks attended to as one. `attend` (HF's numbers, so a covering selection is
    bit for bit dense; blocks joined first), or with `rest`, merged with it
    (sparse.decode_attention, over the blocks as they are)."""
    if rest is None:
        if not isinstance(key, torch.Tensor):
            key, value = (torch.cat(x, dim=1).unsqueeze(0) for x in (key, value))
        return attend(module, query, key, value, None, **kwargs)
    scale = kwargs.get("scaling") or module.scaling
    key, value = (x[0] if isinstance(x, torch.Tensor) else x for x in (key, value))
    out = decode_attention(query[0], key, value, scale, rest)  # (Hq, 1, d)
    return out.transpose(0, 1).unsqueeze(0), None


class _Rotation:
    """RoPE at one position as a (d, d) matrix: q @ R = q * cos + rotate_half(q) * sin. A decode
    step rotates one query per layer at the same position (HF passes every layer the same cos and
    sin tensors), so the matrix is built once per step and each layer's rotation is one product
    instead of nine operations (measured ~25 us per layer on the dev VM)."""

    def __init__(self) -> None:
        self._cos: torch.Tensor | None = None  # kept alive: an `is` check cannot match a new tensor
        self._matrix: torch.Tensor | None = None

    def __call__(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """cos, sin: (1, T, d) as HF passes them; the matrix of the last position."""
        if cos is not self._cos or self._matrix is None:
            c, s = cos[0, -1].float(), sin[0, -1].float()
            half = c.shape[0] // 2
            matrix = torch.diag_embed(c)
            ids = torch.arange(half)
            matrix[ids + half, ids] = -s[:half]  # out[i] = q[i] cos[i] - q[i + half] sin[i]
            matrix[ids, ids + half] = s[half:]  # out[i + half] = q[i + half] cos + q[i] sin[i + half]
            self._cos, self._matrix = cos, matrix
        return self._matrix


_ROTATION = _Rotation()


def layer_query(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                project=None) -> torch.Tensor:
    """The query `attn` would compute for the last token of `hidden` (its normalised input):
    (num_q_heads, head_dim), post-RoPE; with another layer's `attn`, the layer-ahead estimate.
    `project`: computes the projection instead of `attn.q_proj` (e.g. keeping its output)."""
    q = (project or attn.q_proj)(hidden)[0, -1].view(-1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3
        q = attn.q_norm(q)
    return q.float() @ _ROTATION(cos, sin)


class KVSwapReference:
    """Installs sparse decoding into `model`; `start_sequence` before each prompt."""

    def __init__(self, model, predictor: str, selection: SelectionConfig, adapter=None,
                 layer_ahead: bool = True, measure_recall: bool = False, reselect: bool = True,
                 flush_groups: int = DiskRuntimeConfig.flush_groups) -> None:
        """`layer_ahead`: layers >= 2 predict their query from the previous layer's input;
        `reselect`: they attend to the selection of their own query (the prediction only
        prefetches, as in the disk runtimes' default), else to the predicted selection;
        `flush_groups`: decoded tokens stay in the tail (always attended, not selectable) until
        it holds that many groups, as in the disk runtimes (1: the paper's tail of < G tokens)."""
        if flush_groups < 1:
            raise ValueError(f"flush_groups must be >= 1, got {flush_groups}")
        self.model, self.predictor_name, self.selection, self.adapter = model, predictor, selection, adapter
        self.layer_ahead, self.measure_recall, self.reselect = layer_ahead, measure_recall, reselect
        self.flush_groups = flush_groups
        self.shape = model_shape(model.config)
        self.sparse = True
        self.predictor: Predictor = create_predictor(predictor, self.shape, selection, adapter)
        self.stats = StepStats()
        self._q_pred: dict[int, torch.Tensor] = {}
        self._last: dict[int, set[int]] = {}
        register_attention(ATTENTION_NAME, _attention)
        self._attn = [layer.self_attn for layer in model.model.layers]
        for i, attn in enumerate(self._attn):
            attn._kvswap = self
            attn.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
        model.config._attn_implementation = ATTENTION_NAME
        for module in model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = ATTENTION_NAME

    def start_sequence(self) -> None:
        """Forget the previous sequence's metadata and counters."""
        self.predictor = create_predictor(self.predictor_name, self.shape, self.selection, self.adapter)
        n = self.shape.num_layers
        self.stats = StepStats(recall_sum=[0.0] * n, reuse_sum=[0.0] * n, recall_steps=[0] * n,
                               ahead_hit_sum=[0.0] * n, ahead_steps=[0] * n)
        self._q_pred.clear()
        self._last.clear()

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs):
            nxt = layer + 1
            if not self.layer_ahead or nxt >= self.shape.num_layers:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            if hidden is None or hidden.shape[1] != 1:
                return None
            self._q_pred[nxt] = layer_query(self._attn[nxt], hidden, cos, sin, self.shape.head_dim)
            return None

        return hook

    def _decode(self, module, query, key, value, **kwargs):
        layer, g = module.layer_idx, self.selection.group_size
        real_q = query[0, :, -1]
        predicted = self._q_pred.get(layer) if self.layer_ahead and layer >= 2 else None
        prev = self._last.get(layer)
        previous = None if prev is None else torch.tensor(sorted(prev), dtype=torch.int64)
        # The prediction's selection first: the selection attended to must be the predictor's last
        # (its estimate of the rest is of that one).
        ahead = None
        if predicted is not None and self.reselect:
            ahead = set(self.predictor.select(layer, predicted, previous, rest=False).tolist())
        groups = self.predictor.select(layer, real_q if predicted is None or self.reselect else predicted, previous)
        if ahead is not None and len(groups):
            self.stats.ahead_hit_sum[layer] += sum(gid in ahead for gid in groups.tolist()) / len(groups)
            self.stats.ahead_steps[layer] += 1
        positions = selected_positions(groups, g, self.predictor.num_groups(layer) * g, key.shape[2])
        k_sel, v_sel = gather_kv(key, value, positions)
        st = self.stats
        if layer == 0:
            st.steps += 1
        st.selected_tokens += len(positions)
        chosen = set(groups.tolist())
        if prev:
            st.reuse_sum[layer] += len(chosen & prev) / max(1, len(chosen))
        self._last[layer] = chosen
        if self.measure_recall:
            st.recall_sum[layer] += attention_mass(real_q, key[0], positions, kwargs.get("scaling") or module.scaling)
            st.recall_steps[layer] += 1
        return attend_decode(module, query, k_sel, v_sel, self.predictor.rest(layer, groups), **kwargs)

    def _record_groups(self, module, key, value, new_tokens: int) -> None:
        """Metadata for groups completed before this step's tokens (a group the current token
        completes stays in the tail for this step, so a token always attends to itself); in
        decode only once the tail holds `flush_groups` groups, as the disk runtimes flush it."""
        layer, g = module.layer_idx, self.selection.group_size
        before = key.shape[2] - new_tokens if new_tokens == 1 else key.shape[2]
        have, full = self.predictor.num_groups(layer), before // g
        if new_tokens == 1 and before - have * g < self.flush_groups * g:
            full = have
        if full > have:
            new_k, new_v = (x[0, :, have * g:full * g].transpose(0, 1) for x in (key, value))  # (tokens, H, d)
            self.predictor.append_groups(layer, *(x.reshape(full - have, g, *x.shape[1:]) for x in (new_k, new_v)))


def _attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function HF calls: dense for prefill, sparse for single-token decode."""
    ref: KVSwapReference = module._kvswap
    if key.shape[0] != 1:
        raise ValueError("the KVSwap reference runtime decodes one sequence at a time (batch 1)")
    ref._record_groups(module, key, value, query.shape[2])
    if not ref.sparse or query.shape[2] != 1:
        return attend(module, query, key, value, attention_mask, **kwargs)
    return ref._decode(module, query, key, value, **kwargs)
