"""The disk-backed HF runtime: same tokens as the in-memory reference, with the KV on disk."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kvswap_vllm.predict.base import SelectionConfig
from kvswap_vllm.runtime.hf_disk import DiskRuntimeConfig, KVSwapDisk, generate
from kvswap_vllm.runtime.hf_kvswap import KVSwapReference, model_shape
from kvswap_vllm.store import DiskStore, StoreConfig
from tests.test_hf_reference import PROMPT, adapter_for, greedy_logits, tiny_llama


def disk_store(root: Path, model) -> DiskStore:
    s = model_shape(model.config)
    return DiskStore(StoreConfig(root=root, model_fingerprint="ab" * 16, num_layers=s.num_layers,
                                 num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, group_size=4))


@torch.inference_mode()
def disk_logits(model, seq, prompt: torch.Tensor, steps: int, chunk: int) -> list[torch.Tensor]:
    for start in range(0, prompt.shape[1], chunk):
        out = model(input_ids=prompt[:, start:start + chunk], past_key_values=seq, use_cache=True)
    logits = [out.logits[0, -1]]
    for _ in range(steps):
        out = model(input_ids=logits[-1].argmax().view(1, 1), past_key_values=seq, use_cache=True)
        logits.append(out.logits[0, -1])
    return logits


def assert_same_logits(expected: list[torch.Tensor], got: list[torch.Tensor], bit_for_bit: bool) -> None:
    """Same greedy tokens and logits: bit for bit, or (the order of the attended keys differing)
    within float32 rounding."""
    assert [int(a.argmax()) for a in expected] == [int(b.argmax()) for b in got]
    same = torch.equal if bit_for_bit else (lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5))
    assert all(same(a, b) for a, b in zip(expected, got))


# dense selects every group, so its hot tier must cover the whole context: full budget only.
@pytest.mark.parametrize("predictor, budget", [(p, b) for p in ("kvswap", "kvswap-paper", "quest") for b in (8, 4096)]
                         + [("dense", 4096)])
@pytest.mark.parametrize("reselect", [True, False])
def test_matches_in_memory_reference_bit_for_bit(tmp_path: Path, predictor: str, budget: int, reselect: bool) -> None:
    """The disk runtime attends to exactly what the in-memory reference does, whether layers
    re-select with their own query (default) or attend to the layer-ahead prediction: bit for
    bit, except where a sparse kvswap merges its estimate of the rest (it then attends to the
    hot tier's slots in the order they lie, which only changes how float sums round)."""
    base = tiny_llama()
    adapter = adapter_for(base)
    sel = SelectionConfig(budget, 4)
    ref_model = copy.deepcopy(base)
    KVSwapReference(ref_model, predictor, sel, adapter, reselect=reselect, flush_groups=3).start_sequence()
    expected = greedy_logits(ref_model, PROMPT, 12)
    model = copy.deepcopy(base)
    with disk_store(tmp_path / "kv", model) as store:
        config = DiskRuntimeConfig(sel, predictor, flush_groups=3, prefill_chunk=4096, reselect=reselect)
        rt = KVSwapDisk(model, store, config, adapter)
        seq = rt.new_sequence()
        got = disk_logits(model, seq, PROMPT, 12, chunk=4096)
        assert_same_logits(expected, got, bit_for_bit=predictor != "kvswap" or budget > 8)
        assert store.num_groups(seq.core.name, 0) == (61 + 12) // 4  # every full group went to disk
        assert seq.core.prefetch.stats.ahead > 0 and seq.core.prefetch.stats.synchronous > 0
        seq.close()
        assert store.sequences() == []  # private KV deleted when the sequence ends


@pytest.mark.parametrize("block", [8, 4096])
def test_chunked_prefill_reads_back_from_disk(tmp_path: Path, block: int, monkeypatch) -> None:
    """Chunks 2.. attend to the earlier chunks' KV read back from disk, `prefill_block` tokens
    at a time (never the whole past at once); the logits are dense attention's."""
    from kvswap_vllm.runtime.sequence import KVSwapSequence

    base = tiny_llama()
    model = copy.deepcopy(base)
    dense = greedy_logits(base, PROMPT, 0)[0]
    reads: list[int] = []
    real_read = KVSwapSequence.read_groups
    monkeypatch.setattr(KVSwapSequence, "read_groups", lambda self, layer, ids, out=None: (
        reads.append(len(ids)), real_read(self, layer, ids, out))[1])
    with disk_store(tmp_path / "kv", model) as store:
        config = DiskRuntimeConfig(SelectionConfig(4096, 4), "dense", prefill_chunk=16, prefill_block=block)
        rt = KVSwapDisk(model, store, config)
        seq = rt.new_sequence()
        got = disk_logits(model, seq, PROMPT, 0, chunk=16)[0]
        assert torch.allclose(dense, got, atol=1e-4)
        layers = model.config.num_hidden_layers
        # Past groups before chunks 2, 3, 4 (16 tokens = 4 groups each), per layer.
        assert sum(reads) == (4 + 8 + 12) * layers
        per_read = min(block // 4, 12)
        assert max(reads) == per_read and len(reads) == sum(-(-n // per_read) for n in (4, 8, 12)) * layers
        seq.close()


def test_bad_prefill_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="prefill_block >= group_size"):
        DiskRuntimeConfig(SelectionConfig(400, 4), prefill_block=2)
    with pytest.raises(ValueError, match="prefill_chunk >= 1"):
        DiskRuntimeConfig(SelectionConfig(400, 4), prefill_chunk=0)


def test_a_finished_sequence_frees_its_memory_at_once(tmp_path: Path) -> None:
    """Its hot tier, tail and metadata go when the sequence is closed and dropped, without
    waiting for the cyclic garbage collector (which long-lived objects seldom see: the buffers
    of every finished prompt used to stay resident)."""
    import gc
    import weakref

    model = tiny_llama()
    with disk_store(tmp_path / "kv", model) as store:
        rt = KVSwapDisk(model, store, DiskRuntimeConfig(SelectionConfig(16, 4), "kvswap", flush_groups=2,
                                                        prefill_chunk=32), adapter_for(model))
        gc.disable()
        try:
            generate(model, rt, PROMPT[0].tolist(), 12, eos=set())
            core = weakref.ref(rt.current.core)
            hot = weakref.ref(rt.current.core.hot)
            assert hot().nbytes > 0
            rt.new_sequence()  # closes and drops the finished one
            assert core() is None and hot() is None
        finally:
            gc.enable()
            rt.current.close()


def test_generate_with_rolling_tail_reports_stats(tmp_path: Path) -> None:
    model = tiny_llama()
    with disk_store(tmp_path / "kv", model) as store:
        rt = KVSwapDisk(model, store, DiskRuntimeConfig(SelectionConfig(16, 4), "kvswap", flush_groups=4,
                                                        prefill_chunk=32), adapter_for(model))
        tokens, info = generate(model, rt, PROMPT[0].tolist(), 20, eos=set())
        assert len(tokens) == 20
        assert info["hot_tier_bytes"] > 0 and info["metadata_bytes"] > 0
        assert 0.0 <= info["reuse_rate"] <= 1.0 and info["prefetched_loads"] > 0
        rt.current.close()


#: Where the HF runtime is tested: the CPU, and a CUDA GPU where the machine has one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_models_device(tmp_path: Path, device: str) -> None:
    """Hot tier and tails live where the model runs (a GPU's memory is then the hot tier); with
    a budget covering the context the logits equal dense attention's, also across prefill chunks
    read back from disk; with a small budget a GPU run equals the CPU run."""
    base = tiny_llama()
    adapter = adapter_for(base)
    dense = greedy_logits(base, PROMPT, 6)
    got: dict[tuple[str, int], list[torch.Tensor]] = {}
    for dev in dict.fromkeys(("cpu", device)):
        for budget in (4096, 8):
            model = copy.deepcopy(base).to(dev)
            with disk_store(tmp_path / f"kv-{dev}-{budget}", model) as store:
                config = DiskRuntimeConfig(SelectionConfig(budget, 4), "kvswap", flush_groups=3, prefill_chunk=16)
                seq = KVSwapDisk(model, store, config, adapter).new_sequence()
                got[dev, budget] = [x.cpu() for x in disk_logits(model, seq, PROMPT.to(dev), 6, chunk=16)]
                tails = [t for t in seq.core._k if t is not None]
                assert seq.core.hot.slots.device.type == dev and tails and all(t.device.type == dev for t in tails)
                assert store.stats.bytes_read > 0
                seq.close()
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(dense, got[device, 4096]))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got["cpu", 8], got[device, 8]))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(dense, got[device, 8]))  # M=8 is sparse


@torch.inference_mode()
def test_prefill_mlp_runs_in_row_slices_with_the_same_result() -> None:
    from kvswap_vllm.runtime.hf_disk import _in_row_slices

    mlp = tiny_llama().model.layers[0].mlp
    x = torch.randn(1, 700, mlp.gate_proj.in_features)
    calls: list[int] = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[1])
        return mlp(t)

    sliced = _in_row_slices(counted, 256)
    assert torch.allclose(sliced(x), mlp(x), atol=1e-6) and calls == [256, 256, 188]
    assert torch.equal(sliced(x[:, :5]), mlp(x[:, :5])) and calls[-1] == 5  # short inputs: one call


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_layers_own_query_is_projected_once_per_step(tmp_path: Path, prefetch: bool, monkeypatch) -> None:
    """The hook projects a layer's query to select with, and its attention reuses that
    projection; a layer-ahead estimate (the next layer's W_q on this layer's input) does not
    stand in for the next layer's own query. Logits as in the test above."""
    base = tiny_llama()
    adapter = adapter_for(base)
    sel = SelectionConfig(8, 4)
    ref_model = copy.deepcopy(base)
    KVSwapReference(ref_model, "kvswap", sel, adapter, flush_groups=3).start_sequence()
    expected = greedy_logits(ref_model, PROMPT, 4)
    model = copy.deepcopy(base)
    weights = {id(layer.self_attn.q_proj.weight): i for i, layer in enumerate(model.model.layers)}
    calls: list[int] = []
    real_linear = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        if id(weight) in weights and x.shape[-2] == 1:
            calls.append(weights[id(weight)])
        return real_linear(x, weight, bias)

    with disk_store(tmp_path / "kv", model) as store:
        rt = KVSwapDisk(model, store, DiskRuntimeConfig(sel, "kvswap", flush_groups=3, prefill_chunk=4096,
                                                        prefetch=prefetch), adapter)
        seq = rt.new_sequence()
        monkeypatch.setattr(torch.nn.functional, "linear", counting)
        got = disk_logits(model, seq, PROMPT, 4, chunk=4096)
        seq.close()
    assert_same_logits(expected, got, bit_for_bit=False)
    layers = len(weights)
    ahead = (layers - 2) if prefetch else 0  # layers >= 2 are predicted by the layer before them
    assert len(calls) == 4 * (layers + ahead)
