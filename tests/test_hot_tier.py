"""The hot tier on a real disk tier: loads read only what is not resident, several sequences'
loads go to the store in one call, and gathers hand out the selected groups' K/V."""

from __future__ import annotations

from pathlib import Path

import torch

from kvswap_vllm.hot.tier import HotTier
from kvswap_vllm.store import DiskStore, StoreConfig

FP = "0123456789abcdef" * 2


def _store(tmp_path: Path) -> DiskStore:
    return DiskStore(StoreConfig(root=tmp_path / "kv", model_fingerprint=FP, num_layers=2, num_kv_heads=3,
                                 head_dim=64, group_size=4))


def _kv(groups: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of groups `ids` in that order, as gather returns them: (H, n * G, D)."""
    g = groups[ids]  # (n, H, 2, G, D)
    n, h, _, gs, d = g.shape
    return (g[:, :, 0].transpose(0, 1).reshape(h, n * gs, d), g[:, :, 1].transpose(0, 1).reshape(h, n * gs, d))


def test_loads_read_only_misses_and_gathers_hand_out_the_selection(tmp_path: Path) -> None:
    groups = torch.randn(12, 3, 2, 4, 64)
    with _store(tmp_path) as store:
        store.open_sequence("s")
        store.write_groups("s", 1, 0, groups)
        hot = HotTier(store, "s", slots_per_layer=4)
        res = hot.load(1, torch.tensor([0, 1, 2]))  # everything selected: slots fill in group order
        assert res.read == [0, 1, 2] and res.slots.tolist() == [0, 1, 2]
        k, v = hot.gather(1, res.slots)
        assert all(torch.equal(a, b) for a, b in zip((k, v), _kv(groups, [0, 1, 2])))
        hot.load(1, torch.tensor([0, 1, 2, 3]))
        res = hot.load(1, torch.tensor([0, 2, 3, 5]))  # group 1 evicted, 5 takes its slot
        assert res.read == [5] and res.hits == 3 and res.slots.tolist() == [0, 2, 3, 1]
        k, v = hot.gather(1, res.slots)  # in the order of the selection
        assert all(torch.equal(a, b) for a, b in zip((k, v), _kv(groups, [0, 2, 3, 5])))
        # In any order: a selection that fills every slot is handed out as the slots lie, no copy.
        k, v = hot.gather(1, res.slots, ordered=False)
        assert all(torch.equal(a, b) for a, b in zip((k, v), _kv(groups, [0, 5, 2, 3])))
        assert k.data_ptr() == hot.slots[1, 0].data_ptr() and v.data_ptr() == hot.slots[1, 1].data_ptr()
        k, _ = hot.gather(1, res.slots[:3], ordered=False)  # fewer: gathered, in order
        assert torch.equal(k, _kv(groups, [0, 2, 3])[0])


def test_a_load_result_is_gathered_as_its_slots_and_keeps_them_after_later_loads(tmp_path: Path) -> None:
    groups = torch.randn(12, 3, 2, 4, 64)
    with _store(tmp_path) as store:
        store.open_sequence("s")
        store.write_groups("s", 1, 0, groups)
        hot = HotTier(store, "s", slots_per_layer=4)
        hot.load(1, torch.tensor([0, 1, 2, 3]))
        res = hot.load(1, torch.tensor([3, 5, 1]))  # fewer than the slots: gathered in this order
        for ordered in (True, False):
            k, v = hot.gather(1, res, ordered=ordered)
            assert all(torch.equal(a, b) for a, b in zip((k, v), _kv(groups, [3, 5, 1])))
        full = hot.load(1, torch.tensor([1, 3, 5, 7]))
        k, v = hot.gather(1, full, ordered=False)  # every slot selected: the storage as it lies
        assert k.data_ptr() == hot.slots[1, 0].data_ptr()
        k, v = hot.gather(1, full)
        assert all(torch.equal(a, b) for a, b in zip((k, v), _kv(groups, [1, 3, 5, 7])))
        hot.load(1, torch.tensor([8, 9, 10, 11]))  # evicts every group of `res`
        assert res.slots.tolist() == [3, 0, 1]  # as its load left them (5 took the slot of 0)


def test_several_sequences_load_in_one_store_call(tmp_path: Path) -> None:
    a, b = torch.randn(10, 3, 2, 4, 64), torch.randn(10, 3, 2, 4, 64)
    with _store(tmp_path) as store:
        for name, kv in (("a", a), ("b", b)):
            store.open_sequence(name)
            store.write_groups(name, 0, 0, kv)
        tiers = [HotTier(store, "a", 4), HotTier(store, "b", 4)]
        calls = []
        real = store.start_reads
        store.start_reads = lambda requests: calls.append(len(requests)) or real(requests)
        res = HotTier.load_many(tiers, 0, [torch.tensor([1, 4, 7]), torch.tensor([0, 9])])
        assert calls == [2] and [r.read for r in res] == [[1, 4, 7], [0, 9]]
        assert torch.equal(tiers[0].gather(0, res[0].slots)[0], _kv(a, [1, 4, 7])[0])
        assert torch.equal(tiers[1].gather(0, res[1].slots)[1], _kv(b, [0, 9])[1])
        res = HotTier.load_many(tiers, 0, [torch.tensor([1, 4, 7]), torch.tensor([0, 9])])  # all resident
        assert calls == [2] and all(r.hits == len(r.groups) and not r.read for r in res)


def test_own_query_loads_wait_for_background_loads_and_leave_their_errors_to_them(tmp_path: Path) -> None:
    """load_now runs after the sequence's background loads (they share its staging buffer); a
    background load that failed raises where its layer waits, not in another layer's load."""
    import pytest

    from kvswap_vllm.prefetch.pipeline import LayerPrefetcher

    groups = torch.randn(8, 3, 2, 4, 64)
    with _store(tmp_path) as store:
        store.open_sequence("s")
        for layer in (0, 1):
            store.write_groups("s", layer, 0, groups)
        hot = HotTier(store, "s", 4)
        pre = LayerPrefetcher(hot)
        real = hot.load
        hot.load = lambda layer, g: (_ for _ in ()).throw(OSError("disk gone")) if layer == 0 else real(layer, g)
        pre.submit(0, torch.tensor([1, 2]), "ahead")
        LayerPrefetcher.load_now([pre], 1, [torch.tensor([3, 5])], ["own"])
        assert pre.wait(1).read == [3, 5]
        with pytest.raises(OSError, match="disk gone"):
            pre.wait(0)
        pre.close()
