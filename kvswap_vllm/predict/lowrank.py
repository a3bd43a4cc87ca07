"""Low-rank key predictors (KVSwap). Both keep the same metadata: per token per layer, the
keys of all KV heads concatenated and projected on the joint basis A (H*d, r): `rank` numbers,
exchanged (files, `group_metadata`) in float16 and kept in memory in the scoring dtype.

Scoring reads every token's low-rank key of the layer, once per selection, and at batch 8 x 7k
tokens that is 215 MB per step: memory-bound. 8-bit keys (the default) are multiplied as they
are, by the query quantised the same way (torch._int_mm): measured at 7k tokens, cache-cold,
136 us per sequence and layer (with the query then in two int8 parts) against 310 us converting
the keys to bfloat16 first. 16-bit keys: where the CPU multiplies bfloat16 natively (AVX512-BF16 or
AMX on x86, BF16 on Arm), they are kept in bfloat16 and multiplied as they are; elsewhere they
stay float16 and go through a float32 buffer (0.25 against 0.78 ms on the dev VM).

- JointLowRank ("kvswap-paper", as published): the query is averaged within each GQA group,
  each KV head's part projected through its (d, r) slice of A and the parts summed: one
  score per token, shared by heads; a group's score is the max over its tokens.
- HeadwiseLowRank ("kvswap"): every query head is projected through its own KV head's slice
  of A and scored separately (A A^T keeps each head's share of q.k); per head the scores
  become an estimated attention distribution (softmax over tokens); a group's score is its
  estimated attention mass, summed over heads. Averaging queries across heads, as the paper
  does, lets heads cancel out; measured on SmolLM2 (docs/results/quality.json), scoring heads
  separately keeps more passkeys at the same metadata size. (Per-KV-head bases of rank r/H,
  also in the adapter, did worse at 7k tokens: too few dimensions per head.)
  Besides selecting, it estimates the attention the selection leaves out (`rest`): per head,
  the estimated distribution restricted to the unselected tokens gives that block's mass
  (log-sum-exp of the low-rank logits) and its output (the distribution applied to rank-
  `residual_rank` low-rank values, v B_v per token, mapped back with B_v^T). Measured on
  SmolLM2 (docs/results/residual_probe_s20.json): the mass alone with mean values does worse
  than nothing; with rank-8 values top-1 agreement goes from 96.3% to 97.3% at M = 400.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import logging
import math
import os
import threading
from pathlib import Path

import torch

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.predict import native
from kvswap_vllm.predict.base import Predictor, RestEstimate, RowBuffer

log = logging.getLogger("kvswap")


# Per thread and dtype, a buffer the stored keys are converted into for scoring: a fresh
# tensor per selection (1.8 MB at 7k tokens in float32) costs more in page faults than the
# conversion itself (measured: 0.65 ms vs 0.03 ms into a reused buffer).
_SCRATCH = threading.local()


def _scratch(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    bufs = _SCRATCH.__dict__.setdefault("keys", {})
    buf = bufs.get(dtype)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
        buf = bufs[dtype] = torch.empty(max(rows, int(1.5 * (0 if buf is None else buf.shape[0]))), cols, dtype=dtype)
    return buf[:rows]


class _BufferPool:
    """Tensors for a selection's transients that scale with the context (logits, probabilities,
    values: (heads, tokens) each), taken and given back instead of allocated per selection. Both
    runtimes map allocations of 1 MiB and more to their own pages (resources.
    return_freed_memory_promptly), so without reuse each of these pays its page faults at every
    selection once the context is long: measured on a 4-layer model with 8 query heads at 32k
    tokens, selection + rest estimate 2.92 ms with that setting against 0.91 ms without.
    A tensor is held by one owner between `take` and `give`; one never given back is freed; free
    ones smaller than a request that none fits are dropped."""

    #: Free tensors kept at most (a batch's sequences hold two each between selection and estimate).
    MAX_FREE = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        need = math.prod(shape)
        with self._lock:
            fits = [i for i, t in enumerate(self._free) if t.dtype == dtype and t.numel() >= need]
            base = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
            if base is None:  # outgrown: the contexts only grow, so they would stay unused
                self._free = [t for t in self._free if t.dtype != dtype or t.numel() >= need]
        if base is None:  # room for the context to grow a while (one token per step)
            with torch.inference_mode(False):  # reusable outside inference mode too
                base = torch.empty(need + need // 8 + 1024, dtype=dtype)
        return base[:need].view(shape)

    def give(self, *tensors: torch.Tensor) -> None:
        with self._lock:
            for t in tensors:
                base = t if t._base is None else t._base
                if all(f is not base for f in self._free):
                    self._free.append(base)
            if len(self._free) > self.MAX_FREE:
                self._free.sort(key=torch.Tensor.numel)
                del self._free[:len(self._free) - self.MAX_FREE]


_POOL = _BufferPool()


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot products (else torch emulates them, slowly)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((line.partition(":")[2].split() for line in lines if line.startswith(("flags", "Features"))), [])
    return bool(set(flags) & {"avx512_bf16", "amx_bf16", "bf16"})


#: How the low-rank keys are kept in memory and multiplied (see the module's docstring);
#: KVSWAP_LOWRANK_DTYPE=float16 or bfloat16 overrides the choice (A/B runs).
SCORE_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
    os.environ.get("KVSWAP_LOWRANK_DTYPE", ""), torch.bfloat16 if native_bf16() else torch.float16)


def _int8_products_work() -> bool:
    """Whether this torch multiplies int8 matrices on the CPU (torch._int_mm), exactly."""
    try:
        a = torch.arange(-32, 32, dtype=torch.int8).view(2, 32)
        return torch.equal(torch._int_mm(a, a.T), a.int() @ a.int().T)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


#: Whether 8-bit keys are multiplied as int8 (else converted to SCORE_DTYPE first). Measured at
#: 7k tokens, cache-cold, 9 query heads x rank 64: 136 us per product (the query in two parts)
#: against 310 us converting the keys to bfloat16 and multiplying those.
INT8_PRODUCTS = _int8_products_work()


def quantize_int8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., m, r) float32 -> (..., m, r) int8 and (..., m, 1) float32 scales s, q = s * q8 to
    within s / 2 = max|row| / 254 per number: each row on its largest magnitude / 127, as the
    keys are. (Two int8 parts, 254 * hi + lo, gave 1/64516: measured on SmolLM2 at M = 400, the
    same quality, for twice the product's output and a pass more per selection.)"""
    scale = torch.linalg.vector_norm(q, float("inf"), dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
    scale.div_(127)
    return torch.round(q / scale).to(torch.int8), scale


#: Largest rank whose int8 products cannot overflow int32.
MAX_INT8_RANK = (2**31 - 1) // (128 * 128)


class _LowRank(Predictor):
    needs_adapter = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.selection.key_rank:
            self.adapter = self.adapter.leading(self.selection.key_rank)
        self._lr = [RowBuffer() for _ in range(self.shape.num_layers)]  # (tokens, r) per layer
        # key_bits 8: per token, the scale of its int8 row (tokens,) float32 per layer.
        self._lr_scale = [RowBuffer() for _ in range(self.shape.num_layers)] if self.selection.key_bits == 8 else []

    def _rows(self, layer: int) -> torch.Tensor:
        """(tokens, r) low-rank keys as kept: SCORE_DTYPE, half the memory of float32 (scores only
        rank groups, which half precision does not change in practice), or int8 (key_bits 8)."""
        return self._lr[layer].view()

    def _append_keys(self, layer: int, rows: torch.Tensor) -> None:
        """Keep low-rank keys (tokens, r); with 8 bits, each token's row scaled to its largest
        magnitude (symmetric: a row's error is at most 1/254 of its largest number)."""
        if not self._lr_scale:
            self._lr[layer].append(rows.to(SCORE_DTYPE))
            return
        x = rows.float()
        scale = x.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self._lr[layer].append(torch.round(x / scale.unsqueeze(1)).to(torch.int8))
        self._lr_scale[layer].append(scale)

    @property
    def _int8_products(self) -> bool:
        """Whether `_logits` multiplies the keys as int8 (8-bit keys, torch can, no overflow)."""
        return bool(self._lr_scale) and INT8_PRODUCTS and self.adapter.rank <= MAX_INT8_RANK

    def _logits(self, layer: int, q_lr: torch.Tensor, q8: tuple[torch.Tensor, torch.Tensor] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """(m, tokens) float32 products of low-rank queries q_lr (m, r) float32 with the layer's
        low-rank keys (into `out` when given). 8-bit keys are multiplied as they are, by the
        query quantised alike (`q8`: quantize_int8(q_lr), when the caller has it);
        16-bit keys in bfloat16 where the CPU multiplies it natively, else through float32."""
        rows = self._rows(layer)
        m, tokens = q_lr.shape[0], rows.shape[0]
        out = torch.empty(m, tokens) if out is None else out
        if self._int8_products:
            q8, s = quantize_int8(q_lr) if q8 is None else q8
            prod = torch._int_mm(q8, rows.T, out=_POOL.take((m, tokens), torch.int32))
            torch.mul(prod, s, out=out)  # converted as it is written (no temporary)
            _POOL.give(prod)
        else:
            dtype = torch.bfloat16 if SCORE_DTYPE == torch.bfloat16 else torch.float32
            keys = rows if rows.dtype == dtype else _scratch(*rows.shape, dtype).copy_(rows)
            if dtype == torch.float32:
                torch.matmul(q_lr, keys.T, out=out)
            else:  # the product rounded to bfloat16 once, then in float32
                prod = torch.matmul(q_lr.to(dtype), keys.T, out=_POOL.take((m, tokens), dtype))
                out.copy_(prod)
                _POOL.give(prod)
        if self._lr_scale:
            out.mul_(self._lr_scale[layer].view())
        return out

    def _buffers(self) -> Iterable[tuple[RowBuffer, int]]:
        return ((buf, self.selection.group_size) for buf in (*self._lr, *self._lr_scale))

    def _group_max(self, token_scores: torch.Tensor) -> torch.Tensor:
        return token_scores.view(-1, self.selection.group_size).amax(dim=1)


class JointLowRank(_LowRank):
    name = "kvswap-paper"

    def group_metadata(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        n, g = keys.shape[:2]
        return _project(keys, self.adapter.joint[layer])  # (groups, G, r)

    def _store(self, layer: int, rows: torch.Tensor) -> None:
        if rows.shape[-1] != self.adapter.rank:
            raise ValueError(f"metadata rows of {rows.shape[-1]} numbers per token, this predictor keeps "
                             f"{self.adapter.rank}")
        self._append_keys(layer, rows.reshape(-1, rows.shape[-1]))

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        s = self.shape
        q = query.float().view(s.num_kv_heads, s.gqa, s.head_dim).mean(dim=1)  # GQA-averaged (H, d)
        a = self.adapter.joint[layer].view(s.num_kv_heads, s.head_dim, -1)  # per-head slices (H, d, r)
        q_lr = torch.einsum("hd,hdr->r", q, a) / s.num_kv_heads
        return self._group_max(self._logits(layer, q_lr.unsqueeze(0))[0])


def _project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(groups, G, H, d) keys or values -> (groups, G, r) on a joint basis (H * d, r), float16."""
    n, g = x.shape[:2]
    return (x.reshape(n * g, -1).float() @ basis).half().view(n, g, -1)


#: Below this estimated mass per head the rest is taken as nothing (its share is then within
#: float32 rounding of the selection's, and dividing by it would amplify that rounding).
MIN_REST_MASS = 1e-6


def value_rank_for(residual_rank: int, adapter) -> int:
    """The rank of the low-rank values a `kvswap` predictor keeps: `residual_rank`, or 0 when the
    adapter has no value bases (an older kvswap calibrated it: a warning says how to add them)."""
    if residual_rank == 0:
        return 0
    if adapter.value_rank == 0:
        log.warning("kvswap: the low-rank adapter has no value bases (an older kvswap calibrated it), so decoding "
                    "attends to the selection alone; run `kvswap calibrate --if-missing` to add them")
        return 0
    if residual_rank > adapter.value_rank:
        raise KVSwapError(f"residual_rank {residual_rank} exceeds the adapter's value rank {adapter.value_rank}")
    return residual_rank


class HeadwiseLowRank(JointLowRank):
    name = "kvswap"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.value_rank = value_rank_for(self.selection.residual_rank, self.adapter)
        # (tokens, rv) float32, kept as columns: the rest estimate multiplies the probabilities by
        # each column, as they are (a float32 copy per selection cost 49 us at 7k tokens, cold)
        self._lv = [RowBuffer(columns=True) for _ in range(self.shape.num_layers)] if self.value_rank else []
        # Per layer, (H, rv, d): each KV head's value basis, transposed (views of the adapter's).
        s = self.shape
        self._value_out = [v[:, :self.value_rank].view(s.num_kv_heads, s.head_dim, -1).transpose(1, 2)
                           for v in self.adapter.value] if self.value_rank else []
        # From score_batch to note_selection, per layer: what the rest estimate needs of the
        # scoring; from note_selection to prepare_rest, with the selection.
        self._scored: dict[int, _Scored] = {}
        self._selected: dict[int, tuple[torch.Tensor, _Scored]] = {}
        self._rest: dict[int, RestEstimate | None] = {}

    @property
    def needs_values(self) -> bool:
        return self.value_rank > 0

    @property
    def metadata_id(self) -> str:
        base = super().metadata_id
        return f"{base}:v{self.value_rank}" if self.value_rank else base

    def group_metadata(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Low-rank keys, then (with a residual) low-rank values: (groups, G, r + rv)."""
        rows = super().group_metadata(layer, keys)
        if not self.value_rank:
            return rows
        if values is None:
            raise ValueError("predictor 'kvswap' with residual_rank > 0 needs the values of new groups")
        return torch.cat([rows, _project(values, self.adapter.value[layer][:, :self.value_rank])], dim=-1)

    def _store(self, layer: int, rows: torch.Tensor) -> None:
        r = self.adapter.rank
        if rows.shape[-1] != r + self.value_rank:
            raise ValueError(f"metadata rows of {rows.shape[-1]} numbers per token, this predictor keeps "
                             f"{r} + {self.value_rank}")
        super()._store(layer, rows[..., :r])
        if self.value_rank:
            self._lv[layer].append(rows[..., r:].reshape(-1, self.value_rank).float())

    def _buffers(self) -> Iterable[tuple[RowBuffer, int]]:
        yield from super()._buffers()
        yield from ((buf, self.selection.group_size) for buf in self._lv)

    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        return self.score_batch([self], layer, query.unsqueeze(0), rest=False)[0]  # no selection follows

    def note_selection(self, layer: int, groups: torch.Tensor) -> None:
        scored = self._scored.pop(layer, None)
        self._rest[layer] = None
        _Scored.release(self._selected.pop(layer, (None, None))[1])  # an earlier selection's, never estimated
        if scored is not None:
            self._selected[layer] = (groups, scored)

    def prepare_rest(self, layer: int) -> None:
        pending = self._selected.pop(layer, None)
        if pending is not None:
            self._rest[layer] = self._estimate_rest(layer, *pending)
            _Scored.release(pending[1])

    def rest(self, layer: int, groups: torch.Tensor) -> RestEstimate | None:
        self.prepare_rest(layer)
        est = self._rest.get(layer)
        return est if est is not None and torch.equal(est.groups, groups) else None

    def _estimate_rest(self, layer: int, groups: torch.Tensor, scored: "_Scored") -> RestEstimate:
        """The unselected tokens' share of each head's estimated distribution, as a softmax block:
        its log-sum-exp and its output over their low-rank values (mapped back per KV head), i.e.
        the whole distribution's (from the scoring) minus the selection's, which takes M tokens."""
        s, g, probs = self.shape, self.selection.group_size, scored.probs
        if native.available():
            out_lr, rest_lse = torch.empty(s.num_q_heads, self.value_rank), torch.empty(s.num_q_heads)
            native.rest(probs, scored.values, g, groups, scored.out_lr, scored.lse, MIN_REST_MASS, out_lr, rest_lse,
                        native.scratch("rest", (s.num_q_heads + self.value_rank) * groups.numel() * g))
        else:
            out_lr, rest_lse = self._rest_in_torch(groups, scored)
        out = torch.bmm(out_lr.view(s.num_kv_heads, s.gqa, -1), self._value_out[layer]).view(s.num_q_heads, -1)
        return RestEstimate(groups, out, rest_lse)

    def _rest_in_torch(self, groups: torch.Tensor, scored: "_Scored") -> tuple[torch.Tensor, torch.Tensor]:
        """What native.rest computes, where it cannot be built: (q_heads, rv) and (q_heads,)."""
        g, probs = self.selection.group_size, scored.probs
        n = probs.shape[1] // g  # the groups scored (those flushed since are not part of its rest)
        # The selected groups' probabilities and values, gathered by group (M/G ids, not M token
        # positions: 3x cheaper), in the selection's token order. The values are a strided view
        # of the predictor's columns, which index_select would first copy whole (82 us per layer
        # at 7k tokens, measured in a decode step); indexing reads only the selected groups.
        picked = probs.view(-1, n, g).index_select(1, groups).flatten(1)  # (q_heads, M)
        chosen = scored.values.view(-1, n, g)[:, groups].flatten(1)  # (rv, M)
        mass = 1 - picked.sum(dim=-1)
        left, kept = mass > MIN_REST_MASS, mass.clamp_min(MIN_REST_MASS)
        # (q_heads, rv): the rest's output, normalised; zero where nothing is left
        out_lr = (scored.out_lr - picked @ chosen.T).mul_((left / kept).unsqueeze(-1))
        return out_lr, (scored.lse + torch.log(kept)).masked_fill_(~left, float("-inf"))

    def _distribution(self, layer: int, q_lr: torch.Tensor, q8: tuple[torch.Tensor, torch.Tensor] | None,
                      group_mass: torch.Tensor, lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per head, the estimated attention distribution over the layer's tokens, (q_heads,
        tokens) float32 from the pool, and (with `lse`) the log-sum-exp of its logits; writes each
        group's mass summed over heads into `group_mass`. The softmax runs along contiguous rows
        (3x faster than along columns), in float32 whatever the keys' dtype."""
        s, g = self.shape, self.selection.group_size
        tokens = group_mass.numel() * g
        probs = _POOL.take((s.num_q_heads, tokens), torch.float32)
        if self._int8_products and native.available():
            q8, qscale = quantize_int8(q_lr) if q8 is None else q8
            prod = torch._int_mm(q8, self._rows(layer).T, out=_POOL.take((s.num_q_heads, tokens), torch.int32))
            out_lse = torch.empty(s.num_q_heads)
            native.softmax_groups(prod, qscale.view(-1), self._lr_scale[layer].view(), g, probs, out_lse, group_mass,
                                  native.scratch("token_mass", tokens))
            _POOL.give(prod)
            return probs, out_lse
        logits = self._logits(layer, q_lr, q8, out=_POOL.take((s.num_q_heads, tokens), torch.float32))
        torch.ops.aten.softmax.int_out(logits, -1, torch.float32, out=probs)
        # The log-sum-exp read off the softmax at each head's largest logit, lse = logit - log p
        # there, where p is the largest probability (>= 1/tokens: no underflow); logsumexp would
        # exponentiate every logit again, max with indices is 3x slower than two amax.
        out_lse = logits.amax(dim=-1) - torch.log(probs.amax(dim=-1)) if lse else None
        torch.sum(probs.sum(dim=0).view(-1, g), dim=1, out=group_mass)
        _POOL.give(logits)
        return probs, out_lse

    @classmethod
    def score_batch(cls, predictors: list["HeadwiseLowRank"], layer: int, queries: torch.Tensor,
                    rest: bool = True) -> torch.Tensor:
        first = predictors[0]
        s, g = first.shape, first.selection.group_size
        a = first.adapter.joint[layer].view(s.num_kv_heads, s.head_dim, -1)  # per-head slices (H, d, r)
        q = queries.float().view(len(predictors), s.num_kv_heads, s.gqa, s.head_dim).transpose(0, 1)
        q_lr = torch.bmm(q.reshape(s.num_kv_heads, -1, s.head_dim), a)  # (H, B*gqa, r): one pass for all
        q_lr = q_lr.view(s.num_kv_heads, len(predictors), s.gqa, -1).transpose(0, 1).reshape(
            len(predictors), s.num_q_heads, -1) * s.head_dim**-0.5
        scores = torch.full((len(predictors), max(p.num_groups(layer) for p in predictors)), float("-inf"))
        # Keys scored per sequence: padding the batch to one tensor costs more memory traffic than
        # the matmul saves (b8 x 7k tokens: 11 -> 7 ms per selection).
        q8 = quantize_int8(q_lr) if first._int8_products else None  # once for the batch
        for i, p in enumerate(predictors):
            n = p.num_groups(layer)
            keep = bool(p.value_rank and rest)  # kept for the rest of the selection (note_selection)
            probs, lse = p._distribution(layer, q_lr[i], None if q8 is None else (q8[0][i], q8[1][i]), scores[i, :n],
                                         keep)
            _Scored.release(p._scored.pop(layer, None))
            if keep:
                values = p._lv[layer].columns(n * g)
                p._scored[layer] = _Scored(probs, lse, probs @ values.T, values)
            else:
                _POOL.give(probs)
        return scores


@dataclass(frozen=True)
class _Scored:
    """What a rest estimate needs of one sequence's scoring of a layer, taken while the scoring's
    (q_heads, tokens) arrays are in cache: at 8 x 7k tokens, reading them again at the estimate,
    cache-cold, took longer than the products themselves."""

    # (q_heads, tokens) float32, from the pool: the estimated distribution per head.
    probs: torch.Tensor
    # (q_heads,) float32: the log-sum-exp of each head's low-rank logits.
    lse: torch.Tensor
    # (q_heads, rv) float32: the whole distribution applied to the low-rank values.
    out_lr: torch.Tensor
    # (rv, tokens) float32: those values, a view of the predictor's columns
    # (RowBuffer(columns=True)): the product runs along their contiguous rows (3x faster than
    # along the columns of (tokens, rv)).
    values: torch.Tensor

    @staticmethod
    def release(scored: "_Scored | None") -> None:
        if scored is not None:
            _POOL.give(scored.probs)
