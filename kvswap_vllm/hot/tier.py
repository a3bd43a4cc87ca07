"""Group slots of one sequence: per layer M/G slots; a new selection keeps its hits and reads
only the difference from the disk tier ("load only the difference")."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.store.disk_store import DiskStore, PendingReads, ReadRequest, ReadResult
from kvswap_vllm.store.fileio import aligned_tensor


def budget_tokens_for(mib: float, token_bytes: int, num_layers: int, sequences: int, group_size: int,
                      what: str = "the hot tier budget") -> int:
    """M that a hot tier of `mib` MiB affords each of `sequences` sequences: per sequence it
    holds M tokens of every layer plus one layer's staging buffer (`token_bytes`: K+V of one
    token in one layer); whole groups. Less than one group is refused, naming `what`."""
    per_token = token_bytes * (num_layers + 1) * sequences
    m = int(mib * (1 << 20)) // per_token // group_size * group_size
    if m < group_size:
        raise KVSwapError(f"{what} of {mib} MiB holds less than one group of {group_size} tokens per layer for "
                          f"{sequences} sequence(s); need at least {per_token * group_size / (1 << 20):.2f} MiB")
    return m


def id_tensor(ids: list[int]) -> torch.Tensor:
    """(len(ids),) int64 on the CPU: through an array, 3x faster than torch.tensor of a list of
    Python ints (~2.5 instead of 8 us for 100 ids; a decode step makes a few per layer)."""
    return torch.frombuffer(array("q", ids), dtype=torch.int64) if ids else torch.empty(0, dtype=torch.int64)


@dataclass
class LoadResult:
    """What one layer's load did."""

    # The selected group ids, in the order of the selection.
    groups: list[int]
    hits: int
    misses: int
    bytes_read: int
    # Selected groups the disk tier could not serve (never written, evicted or corrupt).
    unavailable: list[int]
    # Groups this load read from the disk tier.
    read: list[int]
    # The layer's group -> slot table as the load left it (a copy: later loads change the table).
    slot_of: dict[int, int] = field(repr=False)

    @cached_property
    def slots(self) -> torch.Tensor:
        """The slot of each selected group (-1: not resident), in the order of the selection;
        built when first asked: attention over a selection that fills every slot needs none."""
        return id_tensor([self.slot_of.get(g, -1) for g in self.groups])


@dataclass
class _Plan:
    """A load, planned: the selected ids, those to read, and the slots free for them."""

    ids: list[int]
    misses: list[int]
    free: list[int]


#: requests(layer, group ids, out): the store reads that fetch a sequence's groups into `out`
#: (consecutive slices of it, in order; a sequence may start with groups of stored prefixes).
ReadRequests = Callable[[int, list[int], torch.Tensor], list[ReadRequest]]


@dataclass
class HotStats:
    selected: int = 0
    hits: int = 0
    bytes_read: int = 0
    unavailable: int = 0

    @property
    def reuse_rate(self) -> float:
        return self.hits / self.selected if self.selected else 0.0


class HotTier:
    """Slots for `slots_per_layer` groups of every layer of one sequence.

    Slot storage: (num_layers, 2, num_kv_heads, slots_per_layer, group_size, head_dim) on
    `device`: the model's device, so attention reads the slots where it runs (a GPU's memory is
    then the hot tier). K/V-major, so the K (and V) of any slots, in order, is one
    index_select and a free view, with no transposing copy on every layer of every step. Reads
    land in a page-aligned host staging buffer (O_DIRECT), in the disk tier's group layout
    (groups, num_kv_heads, 2, group_size, head_dim), and are rearranged once as they are copied
    to the slots.
    """

    def __init__(self, store: DiskStore, sequence: str, slots_per_layer: int,
                 requests: ReadRequests | None = None, reuse: bool = True, device: torch.device | str = "cpu") -> None:
        """`reuse=False`: each load reads all its groups again (the no-reuse baseline)."""
        cfg = store.config
        self.reuse, self.device = reuse, torch.device(device)
        self.store, self.sequence, self.slots_per_layer = store, sequence, slots_per_layer
        # By default the groups are `sequence`'s own in the store.
        self._requests = requests or (lambda layer, ids, out: [ReadRequest(sequence, layer, ids, out)])
        heads, _, group, dim = cfg.group_shape
        shape = (cfg.num_layers, 2, heads, slots_per_layer, group, dim)
        self.slots = aligned_tensor(shape, cfg.torch_dtype) if self.device.type == "cpu" else \
            torch.empty(shape, dtype=cfg.torch_dtype, device=self.device)
        self._slot_of: list[dict[int, int]] = [{} for _ in range(cfg.num_layers)]
        self._stage = aligned_tensor((slots_per_layer, *cfg.group_shape), cfg.torch_dtype)
        self.stats = HotStats()

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size() + self._stage.numel() * self._stage.element_size()

    def load(self, layer: int, groups: torch.Tensor) -> LoadResult:
        """Make every group of `groups` (at most slots_per_layer ids) resident in `layer`'s slots."""
        return HotTier.load_many([self], layer, [groups])[0]

    @staticmethod
    def load_many(tiers: list["HotTier"], layer: int, groups: list[torch.Tensor]) -> list[LoadResult]:
        """`load` for several hot tiers of one store (a batch's sequences) at once: all their
        reads go to the store in one call (one kernel round trip with AIO)."""
        return HotTier.start_many(tiers, layer, groups).finish()

    @staticmethod
    def start_many(tiers: list["HotTier"], layer: int, groups: list[torch.Tensor]) -> "PendingLoad":
        """`load_many`, started: the reads are in flight (with kernel AIO) until `finish()`, which
        the same thread calls before it uses these tiers again."""
        if any(t.store is not tiers[0].store for t in tiers):
            raise ValueError("hot tiers loaded together must share one store")
        plans = [t._plan(layer, g) for t, g in zip(tiers, groups)]
        requests = [t._requests(layer, p.misses, t._stage[:len(p.misses)]) if p.misses else []
                    for t, p in zip(tiers, plans)]
        flat = [r for rs in requests for r in rs]
        return PendingLoad(tiers, layer, plans, requests, tiers[0].store.start_reads(flat) if flat else None)

    def _plan(self, layer: int, groups: torch.Tensor) -> _Plan:
        """Which selected groups to read, and the slots they may take (evicting what is no
        longer selected)."""
        ids = groups.tolist() if isinstance(groups, torch.Tensor) else [int(g) for g in groups]
        if len(ids) > self.slots_per_layer:
            raise ValueError(f"{len(ids)} groups selected, the hot tier has {self.slots_per_layer} slots per layer "
                             "(the dense predictor needs a budget that covers the whole context)")
        table = self._slot_of[layer]
        if not self.reuse:
            table.clear()
        if table:
            misses = [g for g in ids if g not in table]
            if not misses:
                return _Plan(ids, misses, [])
            wanted = set(ids)
            evicted = [g for g in table if g not in wanted]
            free = [table.pop(g) for g in evicted]
            if len(free) < len(misses):  # slots never filled yet (or whose read failed)
                taken = set(table.values()).union(free)
                free += [slot for slot in range(self.slots_per_layer) if slot not in taken]
        else:
            misses, free = ids, list(range(self.slots_per_layer))
        return _Plan(ids, misses, free)

    def _finish(self, layer: int, plan: _Plan, res: ReadResult) -> LoadResult:
        """Put what was read for `plan` into its slots."""
        table, misses = self._slot_of[layer], plan.misses
        if res.found.all():  # the common case: the staged rows as they are, no gathering copy
            ok, unavailable, staged = misses, [], self._stage[:len(misses)]
        else:
            ok = [g for g, f in zip(misses, res.found.tolist()) if f]
            unavailable = [g for g, f in zip(misses, res.found.tolist()) if not f]
            staged = self._stage[torch.from_numpy(np.flatnonzero(res.found))]
        target = plan.free[:len(ok)]
        if ok:
            two, h, _, g, d = self.slots[layer].shape
            rows = staged.to(self.device).view(len(ok), h, two, g * d).permute(2, 1, 0, 3)  # (2, H, n, G*D)
            self.slots[layer].view(two, h, -1, g * d).index_copy_(2, id_tensor(target).to(self.device), rows)
            table.update(zip(ok, target))
        s = self.stats
        s.selected += len(plan.ids)
        s.hits += len(plan.ids) - len(misses)
        s.bytes_read += res.bytes_read
        s.unavailable += len(unavailable)
        return LoadResult(plan.ids, len(plan.ids) - len(misses), len(misses), res.bytes_read, unavailable, list(ok),
                          dict(table))

    def gather(self, layer: int, slots: torch.Tensor | LoadResult,
               ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given slots (or those of a load's selection): each (num_kv_heads,
        len(slots) * group_size, head_dim), in their order; `ordered=False`: in any order
        (attention does not depend on it), which for a selection that fills every slot is the
        layer's slot storage itself, without a copy (0.13 ms per layer and step at M = 400 on
        SmolLM2) and without the slot ids."""
        layer_slots = self.slots[layer]  # (2, H, slots, G, D)
        _, h, n, gs, d = layer_slots.shape
        count = len(slots.groups) if isinstance(slots, LoadResult) else len(slots)
        if not ordered and count == n:  # a selection fills the slots once: every slot is in it
            return layer_slots[0].view(h, n * gs, d), layer_slots[1].view(h, n * gs, d)
        if isinstance(slots, LoadResult):
            slots = slots.slots
        g = layer_slots.index_select(2, slots.to(self.device))  # (2, H, n, G, D), contiguous
        return g[0].view(h, len(slots) * gs, d), g[1].view(h, len(slots) * gs, d)


class PendingLoad:
    """Loads of several hot tiers whose reads are in flight (HotTier.start_many)."""

    def __init__(self, tiers: list[HotTier], layer: int, plans: list[_Plan], requests: list[list[ReadRequest]],
                 reads: PendingReads | None) -> None:
        self.tiers, self.layer, self.plans, self.requests, self.reads = tiers, layer, plans, requests, reads

    def finish(self) -> list[LoadResult]:
        """Wait for the reads and put what was read into the slots; per tier, what its load did."""
        results = iter(self.reads.wait() if self.reads is not None else ())
        return [t._finish(self.layer, p, ReadResult.joined([next(results) for _ in rs], t._stage[:len(p.misses)]))
                for t, p, rs in zip(self.tiers, self.plans, self.requests)]
