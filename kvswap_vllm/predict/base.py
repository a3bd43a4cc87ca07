"""The predictor contract: each method scores groups; the base class selects.

A predictor instance holds the metadata of one sequence, per layer, for its *full* groups
(the unfinished tail group is always attended and needs none). Shapes:
- keys of new groups: (num_groups, group_size, num_kv_heads, head_dim), post-RoPE;
- query: (num_q_heads, head_dim), post-RoPE, the (predicted) query of the layer.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.predict import PREDICTORS, native


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SelectionConfig:
    """How much of the context each layer may attend to."""

    # M: tokens of full groups selected per layer per sequence (the tail comes on top).
    budget_tokens: int = 400
    # G: tokens per group; one group is one disk request.
    group_size: int = 4
    # Groups the layer attended to at its previous step rank this share of the budget
    # (hysteresis x M/G places) higher than they score: a group whose score only jitters around
    # the cut stays instead of being swapped for a near-tie, which would cost a read for no
    # attention mass. New groups ranked within the top (1 - hysteresis) x M/G still always make
    # it. 0 = plain top-k. Measured on SmolLM2 at M = 400 (README, quality): 0.25 reads ~27%
    # fewer groups per step than 0 with the same pass keys and top-1 agreement (perplexity
    # +2.04% vs +1.98% over dense).
    hysteresis: float = 0.25
    # Predictors that can (kvswap) also estimate the attention the selection leaves out, from
    # low-rank keys and rank-`residual_rank` low-rank values of every unselected token, and add it
    # to the exact attention as one more softmax block: 2 x residual_rank bytes more metadata per
    # token per layer. 0 = attend to the selection alone. Measured on SmolLM2 at M = 400
    # (README, quality): rank 8 takes top-1 agreement with dense from 96.3% to 97.3% and
    # perplexity from +2.0% to +0.8% of dense.
    residual_rank: int = 8
    # Low-rank predictors: numbers per token per layer of the low-rank keys at most, i.e. the
    # leading columns of the adapter's key basis (an adapter of lower rank is used whole); 0 = the
    # adapter's rank. The keys are most of the metadata, and scoring reads all of them at every
    # selection, so this sets both the metadata's memory and the selection's cost.
    key_rank: int = 0
    # Low-rank predictors: bits per number of the low-rank keys in memory: 8 (int8 with one
    # float32 scale per token) or 16 (float16, or bfloat16 where the CPU multiplies it). Files
    # and metadata exchanged keep float16 either way. Measured on SmolLM2 at M = 400 (README,
    # stop 25): 8 bits keep top-1 agreement at 97.85% and all pass keys, perplexity +0.53% vs
    # +0.50% of dense, with metadata of 87.6 instead of ~150 bytes per token per layer.
    key_bits: int = 8

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.budget_tokens < self.group_size:
            raise KVSwapError(f"need group_size >= 1 and budget_tokens >= group_size, got {self}")
        for name in ("residual_rank", "key_rank"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise KVSwapError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not _is_int(self.key_bits) or self.key_bits not in (8, 16):
            raise KVSwapError(f"key_bits must be 8 or 16, got {self.key_bits!r}")
        if isinstance(self.hysteresis, bool) or not isinstance(self.hysteresis, (int, float)) or \
                not 0 <= self.hysteresis < 1:
            raise KVSwapError(f"hysteresis must be a number in [0, 1), got {self.hysteresis!r}")

    @property
    def budget_groups(self) -> int:
        return self.budget_tokens // self.group_size

    @property
    def keep_places(self) -> int:
        """Places a group selected at the previous step gains in the ranking."""
        return round(self.hysteresis * self.budget_groups)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def gqa(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def token_bytes(self, element_size: int) -> int:
        """K+V of one token in one layer."""
        return self.num_kv_heads * self.head_dim * 2 * element_size


@dataclass(frozen=True)
class RestEstimate:
    """The attention to the full groups a selection leaves out, estimated: what one softmax block
    over them would give, to be merged with the exact blocks by log-sum-exp
    (attention/blockwise.py)."""

    # The selected group ids (ascending) this is the rest of.
    groups: torch.Tensor
    # (num_q_heads, head_dim) float32: the block's attention output.
    out: torch.Tensor
    # (num_q_heads,) float32: log-sum-exp of its scaled logits (-inf: nothing left out).
    lse: torch.Tensor


class Predictor(ABC):
    """Scores the full groups of one sequence, per layer; `select` keeps the best M/G."""

    name: ClassVar[str]
    #: True when the predictor needs a low-rank adapter.
    needs_adapter: ClassVar[bool] = False
    #: True when every group is selected whatever the budget (exact attention).
    selects_all: ClassVar[bool] = False

    def __init__(self, shape: ModelShape, selection: SelectionConfig, adapter: object | None = None) -> None:
        if self.needs_adapter and adapter is None:
            raise KVSwapError(f"predictor {self.name!r} needs a low-rank adapter (run: kvswap calibrate)")
        self.shape, self.selection, self.adapter = shape, selection, adapter
        self._num_groups = [0] * shape.num_layers

    def num_groups(self, layer: int) -> int:
        return self._num_groups[layer]

    def append_groups(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Record metadata of newly completed groups of `layer`; returns it, one row per group
        (what `import_groups` takes back, e.g. after a restart)."""
        rows = self.group_metadata(layer, keys, values)
        self.import_groups(layer, rows)
        return rows

    def import_groups(self, layer: int, rows: torch.Tensor) -> None:
        """Record metadata rows (num_new_groups, ...) computed earlier by `group_metadata`."""
        if rows.shape[0]:
            self._store(layer, rows)
            self._num_groups[layer] += int(rows.shape[0])

    @property
    def metadata_id(self) -> str:
        """What metadata rows depend on besides the keys: they are only valid for the same id."""
        digest = getattr(self.adapter, "digest", None)
        return self.name if digest is None else f"{self.name}:{digest}"

    def select(self, layer: int, query: torch.Tensor, previous: torch.Tensor | None = None,
               rest: bool = True) -> torch.Tensor:
        """Ids (ascending, int64) of the full groups `layer` should attend to; `previous`: the
        ids it attended to at its previous step (favoured, see SelectionConfig.hysteresis);
        `rest`: whether the layer may attend to this selection (then a predictor that estimates
        the rest keeps what the estimate needs; not for a selection that only prefetches)."""
        return select_batch([self], layer, query.unsqueeze(0), [previous], rest)[0]

    @classmethod
    def score_batch(cls, predictors: list["Predictor"], layer: int, queries: torch.Tensor,
                    rest: bool = True) -> torch.Tensor:
        """(len(predictors), max groups) scores of several sequences' predictors of this class
        for one layer, -inf past each one's groups; `queries` (len(predictors), q_heads, d);
        `rest` as in `select`. Classes that can score a batch in one pass override this."""
        n = max(p.num_groups(layer) for p in predictors)
        out = torch.full((len(predictors), n), float("-inf"))
        for i, (p, q) in enumerate(zip(predictors, queries)):
            out[i, :p.num_groups(layer)] = p.score(layer, q)
        return out

    def group_metadata(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Metadata of keys (num_new_groups, group_size, num_kv_heads, head_dim) and their values
        (same shape; only predictors with `needs_values` use them): one row per group.
        Position-only predictors keep none (rows of size 0)."""
        return torch.empty(keys.shape[0], 0, dtype=torch.uint8)

    @property
    def needs_values(self) -> bool:
        """Whether `group_metadata` needs the values too (it estimates the rest, see `rest`)."""
        return False

    def note_selection(self, layer: int, groups: torch.Tensor) -> None:
        """`select_batch` chose `groups` for `layer` (after `score_batch`, if it scored)."""

    def prepare_rest(self, layer: int) -> None:
        """Compute the estimate of the rest of `layer`'s latest selection now (the runtimes call
        it while that selection's reads are in flight, so the work hides behind the disk);
        otherwise `rest` computes it when first asked."""

    def rest(self, layer: int, groups: torch.Tensor) -> RestEstimate | None:
        """The estimated attention to the full groups outside `groups` (the ids `layer` attends
        to, ascending), if this predictor estimates it and `groups` is its latest selection."""
        return None

    def _store(self, layer: int, rows: torch.Tensor) -> None:
        """Keep metadata rows of new groups (the base class counts them)."""

    @abstractmethod
    def score(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """(num_groups,) importance of each full group of `layer` for `query`."""

    def metadata_bytes(self) -> int:
        """Bytes of metadata held now, over all layers (spare room included)."""
        return sum(buf.nbytes for buf, _ in self._buffers())

    def reserve(self, tokens: int) -> None:
        """Room for the metadata of a `tokens`-token sequence, allocated once (a hint: it still
        grows past it)."""
        groups = tokens // self.selection.group_size
        for buf, rows_per_group in self._buffers():
            buf.reserve(groups * rows_per_group)

    def _buffers(self) -> Iterable[tuple["RowBuffer", int]]:
        """The metadata buffers and the rows each keeps per group (none: position-only)."""
        return ()


def select_batch(predictors: list[Predictor], layer: int, queries: torch.Tensor,
                 previous: list[torch.Tensor | None] | None = None, rest: bool = True) -> list[torch.Tensor]:
    """`Predictor.select` for several sequences at once (one predictor each, all with the same
    selection config); predictors of one class are scored together, in one pass where the
    class can (one engine step, one layer: a few large operations instead of many small ones).
    `previous[i]`: what sequence i attended to at its previous step, or None; `rest` as in
    `Predictor.select`."""
    out: list[torch.Tensor | None] = [None] * len(predictors)
    by_class: dict[type, list[int]] = {}
    for i, p in enumerate(predictors):
        if p.selects_all or p.num_groups(layer) <= p.selection.budget_groups:
            out[i] = torch.arange(p.num_groups(layer))
            p.note_selection(layer, out[i])
        else:
            by_class.setdefault(type(p), []).append(i)
    for cls, rows in by_class.items():
        batch = queries if len(rows) == len(predictors) else queries[rows]
        scores = cls.score_batch([predictors[i] for i in rows], layer, batch, rest)
        selection = predictors[rows[0]].selection
        kept = [None if previous is None else previous[i] for i in rows]
        picked = top_groups(scores, selection.budget_groups, kept, selection.keep_places,
                            [predictors[i].num_groups(layer) for i in rows])
        for i, ids in zip(rows, picked):
            out[i] = ids
            predictors[i].note_selection(layer, ids)
    return out  # type: ignore[return-value]


def top_groups(scores: torch.Tensor, k: int, previous: list[torch.Tensor | None], places: int,
               counts: list[int] | None = None) -> torch.Tensor:
    """(rows, k) ids, ascending, of the k best groups of each row of `scores` (rows, groups),
    the groups of `previous[row]` ranked `places` places higher than they score (ties go to
    them). Rank, not score, so every predictor's scale works the same. `counts[row]`: the
    row's groups (the rest of it is padding); given, the C kernel ranks them in one call."""
    if counts is not None and native.available() and scores.dtype == torch.float32:
        return native.top_groups(scores.contiguous(), counts, k, previous, places)
    if places == 0 or all(p is None or not len(p) for p in previous):
        return torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values
    # Only the k + places best can make it (anything below ranks >= k even when favoured), so
    # ranks are taken among those: a small top-k instead of a sort of every group.
    rows, n = scores.shape
    best = torch.topk(scores, min(n, k + places), dim=1, sorted=True).indices
    favoured = torch.zeros(rows * n, dtype=torch.bool)
    ids = [p + row * n if row else p for row, p in enumerate(previous) if p is not None and len(p)]
    favoured[ids[0] if len(ids) == 1 else torch.cat(ids)] = True
    rank = torch.arange(best.shape[1], dtype=torch.float32) - favoured.view(rows, n).gather(1, best) * (places + 0.5)
    pick = torch.topk(rank, k, dim=1, largest=False, sorted=False).indices
    return best.gather(1, pick).sort(dim=1).values


#: New tokens a sequence's metadata is sized for up front (beyond them it grows): a request's
#: max_tokens is often the whole context window, and sizing for it would hold room never used.
RESERVE_NEW_TOKENS = 1024


def expected_tokens(prompt_tokens: int, max_new_tokens: int | None) -> int:
    """What to `Predictor.reserve` for a request: its prompt and the new tokens it may make,
    at most RESERVE_NEW_TOKENS of them."""
    return prompt_tokens + min(max_new_tokens or 0, RESERVE_NEW_TOKENS)


class RowBuffer:
    """Metadata rows of one layer, appended group by group, kept in one tensor with room to grow:
    an append copies only the new rows, and scoring reads a view. A list of chunks joined at each
    score (the previous way) re-copied the layer at every flush and left the freed chunks as holes
    in the heap: measured on one 7k-token sequence, 44 MB of free heap held as RSS beside 27 MB of
    metadata. `reserve` sizes it once when the final length is known (then no copy at all).
    `columns`: 2-D rows kept transposed, (cols, room), for products that read them by column:
    `view` is then a transposed view, each column contiguous."""

    #: Growth factor when an append overflows the reserve (bounds the spare room; each growth
    #: copies the layer's rows once, ~1 MB at 7k tokens).
    GROWTH = 1.125

    def __init__(self, columns: bool = False) -> None:
        self._columns = columns
        self._data: torch.Tensor | None = None
        self._rows = 0
        self._reserved = 0

    def __len__(self) -> int:
        return self._rows

    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows in all (a hint: appends beyond it still grow)."""
        self._reserved = max(self._reserved, rows)
        if self._data is not None and self._room.shape[0] < rows:
            self._resize(rows)

    def append(self, rows: torch.Tensor) -> None:
        if self._columns and rows.dim() != 2:
            raise ValueError(f"a buffer kept as columns takes 2-D rows, got {tuple(rows.shape)}")
        if self._data is None:
            self._data = self._empty(max(rows.shape[0], self._reserved), rows.shape[1:], rows.dtype)
        elif self._room.shape[1:] != rows.shape[1:] or self._data.dtype != rows.dtype:
            raise ValueError(f"rows {tuple(rows.shape)} {rows.dtype} do not match the layer's "
                             f"{tuple(self._room.shape)} {self._data.dtype}")
        end = self._rows + rows.shape[0]
        if end > self._room.shape[0]:
            self._resize(max(end, int(self._room.shape[0] * self.GROWTH)))
        self._room[self._rows:end] = rows
        self._rows = end

    def view(self) -> torch.Tensor:
        """The rows appended so far (a view: valid until the next append)."""
        if self._data is None:
            raise ValueError("no rows were appended")
        return self._room[:self._rows]

    def columns(self, rows: int | None = None) -> torch.Tensor:
        """A buffer kept as columns: its first `rows` rows (default: all appended) as (cols, rows),
        each column contiguous (a view: valid until the next append)."""
        if not self._columns or self._data is None:
            raise ValueError("columns of a buffer kept as rows, or of no rows")
        return self._data[:, :self._rows if rows is None else min(rows, self._rows)]

    @property
    def _room(self) -> torch.Tensor:
        """All rows, appended and spare, as rows (a transposed view when kept as columns)."""
        return self._data.T if self._columns else self._data

    def _empty(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty((*shape, rows), dtype=dtype) if self._columns else torch.empty((rows, *shape), dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held, spare room included."""
        return 0 if self._data is None else self._data.numel() * self._data.element_size()

    def _resize(self, rows: int) -> None:
        old = self.view()
        self._data = self._empty(rows, old.shape[1:], old.dtype)
        self._room[:self._rows] = old


def predictor_class(name: str) -> type[Predictor]:
    if name not in PREDICTORS:
        raise KVSwapError(f"unknown predictor {name!r}; supported: {', '.join(PREDICTORS)}")
    module, cls = PREDICTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_predictor(name: str, shape: ModelShape, selection: SelectionConfig, adapter: object | None = None) -> Predictor:
    return predictor_class(name)(shape, selection, adapter)
