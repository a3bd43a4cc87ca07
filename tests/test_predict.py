"""One suite over every predictor, plus the adapter and the sparse-attention reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.predict.adapter import AdapterError, LowRankAdapter, _bases
from kvswap_vllm.predict.base import PREDICTORS, ModelShape, RowBuffer, SelectionConfig, create_predictor, select_batch
from tests.helpers import with_value_bases

SHAPE = ModelShape(num_layers=2, num_q_heads=6, num_kv_heads=2, head_dim=16)
SEL = SelectionConfig(budget_tokens=32, group_size=4)  # 8 groups


def random_adapter(rank: int = 16, seed: int = 0) -> LowRankAdapter:
    g = torch.Generator().manual_seed(seed)
    joint, per_head = [], []
    for _ in range(SHAPE.num_layers):
        keys = torch.randn(256, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g)
        j, p, _ = _bases(keys, rank)
        joint.append(j)
        per_head.append(p)
    return with_value_bases(LowRankAdapter("ab" * 16, SHAPE.num_kv_heads, SHAPE.head_dim, rank, tuple(joint),
                                           tuple(per_head)), seed=seed + 100)


@pytest.fixture(params=list(PREDICTORS))
def predictor(request):
    return create_predictor(request.param, SHAPE, SEL, random_adapter())


def values(keys: torch.Tensor) -> torch.Tensor:
    """Values to go with `keys` (predictors that estimate the rest keep their low-rank values)."""
    return keys.roll(1, dims=-1) + 0.5


def keys(n_groups: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_groups, SEL.group_size, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g) * 0.1


def test_selects_everything_within_budget(predictor) -> None:
    predictor.append_groups(0, keys(5), values(keys(5)))
    assert predictor.select(0, torch.randn(6, 16)).tolist() == [0, 1, 2, 3, 4]


def test_selection_is_sorted_unique_and_bounded(predictor) -> None:
    for chunk in (keys(30, 1), keys(20, 2)):  # appended in two steps, as decode does
        predictor.append_groups(1, chunk, values(chunk))
    assert predictor.num_groups(1) == 50
    sel = predictor.select(1, torch.randn(6, 16))
    expected = 50 if predictor.name == "dense" else SEL.budget_groups
    assert len(sel) == expected and sel.tolist() == sorted(set(sel.tolist()))
    assert int(sel.min()) >= 0 and int(sel.max()) < 50


def test_finds_the_group_the_query_points_at(predictor) -> None:
    k = keys(40)
    q = torch.zeros(6, 16)
    q[:, 3] = 10.0
    k[17, 2, :, 3] = 5.0  # one token of group 17, all KV heads, aligned with the query
    predictor.append_groups(0, k, values(k))
    sel = predictor.select(0, q).tolist()
    if predictor.name == "window":  # position only: sinks and the most recent groups
        assert sel == [0] + list(range(33, 40))
    else:
        assert 17 in sel


def test_metadata_size(predictor) -> None:
    predictor.append_groups(0, keys(10), values(keys(10)))
    # bytes per token: low-rank keys, rank 16, int8 and a float32 scale (the default key_bits 8); Quest's
    # min/max keys, float32, per token of a group of 4 (kvswap also keeps its rank-8 low-rank values, float32)
    per_token = {"kvswap": 16 + 4 + 8 * 4, "kvswap-paper": 16 + 4, "quest": 2 * 2 * 16 / 4 * 4, "window": 0, "dense": 0,
                 "oracle": SHAPE.num_kv_heads * SHAPE.head_dim * 4}
    assert predictor.metadata_bytes() == pytest.approx(10 * 4 * per_token[predictor.name])


def test_reserved_metadata_is_allocated_once_and_scores_the_same(predictor) -> None:
    plain = create_predictor(predictor.name, SHAPE, SEL, predictor.adapter)
    predictor.reserve(30 * SEL.group_size)
    held = []
    for chunk in (keys(12, 1), keys(1, 2), keys(17, 3)):  # prefill, then decode's flushes
        predictor.append_groups(1, chunk, values(chunk))
        plain.append_groups(1, chunk, values(chunk))
        held.append(predictor.metadata_bytes())
    whole = create_predictor(predictor.name, SHAPE, SEL, predictor.adapter)
    k = torch.cat([keys(12, 1), keys(1, 2), keys(17, 3)])
    whole.append_groups(1, k, values(k))
    assert held == [whole.metadata_bytes()] * 3  # the reserve from the first append: no spare room
    q = torch.randn(6, 16)
    assert torch.equal(predictor.score(1, q), plain.score(1, q))
    assert torch.equal(predictor.score(1, q), whole.score(1, q))
    predictor.append_groups(1, keys(3, 4), values(keys(3, 4)))  # past the reserve: it still grows
    assert predictor.num_groups(1) == 33
    assert predictor.metadata_bytes() > held[-1] or not held[-1]


@pytest.mark.parametrize("columns", [False, True])
def test_row_buffer_appends_grow_and_refuse_other_rows(columns: bool) -> None:
    buf = RowBuffer(columns)
    with pytest.raises(ValueError, match="no rows"):
        buf.view()
    rows = torch.arange(40.0).view(20, 2)
    for start in range(0, 20, 3):
        buf.append(rows[start:start + 3])
        if start == 6:
            buf.reserve(15)  # a reserve after appends moves what is there
    assert len(buf) == 20 and torch.equal(buf.view(), rows)
    assert (buf.view().stride(0) == 1) == columns  # each column contiguous when kept as columns
    if columns:
        assert torch.equal(buf.columns(), rows.T) and torch.equal(buf.columns(7), rows[:7].T)
        assert buf.columns().stride(1) == 1
    else:
        with pytest.raises(ValueError, match="columns of a buffer kept as rows"):
            buf.columns()
    assert buf.nbytes < 20 * 2 * 4 * RowBuffer.GROWTH + 3 * 2 * 4  # spare room bounded by the growth factor
    with pytest.raises(ValueError, match="do not match"):
        buf.append(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="do not match"):
        buf.append(torch.zeros(1, 2, dtype=torch.float16))


def test_registry_errors() -> None:
    with pytest.raises(KVSwapError, match="unknown predictor 'nope'; supported: kvswap, kvswap-paper"):
        create_predictor("nope", SHAPE, SEL)
    with pytest.raises(KVSwapError, match="needs a low-rank adapter"):
        create_predictor("kvswap", SHAPE, SEL, None)
    with pytest.raises(KVSwapError):
        SelectionConfig(budget_tokens=2, group_size=4)


def test_adapter_roundtrip_and_wrong_model(tmp_path: Path) -> None:
    a = random_adapter()
    a.save(tmp_path / "rank16")
    b = LowRankAdapter.load(tmp_path / "rank16", "ab" * 16)
    assert all(torch.equal(x, y) for x, y in zip(a.joint + a.per_head, b.joint + b.per_head))
    with pytest.raises(AdapterError, match="calibrated for model abababab"):
        LowRankAdapter.load(tmp_path / "rank16", "cd" * 16)
    with pytest.raises(AdapterError, match="no low-rank adapter"):
        LowRankAdapter.load(tmp_path / "missing")
    (tmp_path / "rank16.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="damaged"):
        LowRankAdapter.load(tmp_path / "rank16")


def test_bases_are_orthonormal_and_capture_low_rank_keys() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
    keys = (torch.randn(500, 4, generator=g) @ basis.T).view(500, 2, 16)  # rank-4 keys
    joint, per_head, energy = _bases(keys, 4)
    assert torch.allclose(joint.T @ joint, torch.eye(4), atol=1e-5)
    assert energy > 0.9999 and per_head.shape == (2, 16, 2)


def test_metadata_rows_restore_the_same_scores(predictor) -> None:
    """What a restarted engine does: rows written with the groups, imported by a new predictor,
    give the same selection as the predictor that computed them."""
    from kvswap_vllm.predict.persisted import rows_from_aux, rows_to_aux

    keys = torch.randn(20, SEL.group_size, SHAPE.num_kv_heads, SHAPE.head_dim, generator=torch.Generator().manual_seed(3))
    other = create_predictor(predictor.name, SHAPE, SEL, predictor.adapter)
    aux = [rows_to_aux(predictor.append_groups(1, keys[i:i + 5], values(keys[i:i + 5])), predictor.metadata_id)
           for i in range(0, 20, 5)]
    for i, a in enumerate(aux):
        other.import_groups(1, rows_from_aux(a, other.metadata_id, f"file {i}"))
    q = torch.randn(SHAPE.num_q_heads, SHAPE.head_dim)
    assert other.num_groups(1) == 20 and other.metadata_bytes() == predictor.metadata_bytes()
    assert torch.equal(other.select(1, q), predictor.select(1, q))


def test_stored_metadata_of_another_adapter_or_damaged_is_refused() -> None:
    from kvswap_vllm.predict.persisted import MetadataError, rows_from_aux, rows_to_aux

    p = create_predictor("kvswap", SHAPE, SEL, random_adapter(seed=1))
    k = torch.randn(3, 4, SHAPE.num_kv_heads, SHAPE.head_dim)
    aux = rows_to_aux(p.append_groups(0, k, values(k)), p.metadata_id)
    other = create_predictor("kvswap", SHAPE, SEL, random_adapter(seed=2))
    assert other.metadata_id != p.metadata_id
    with pytest.raises(MetadataError, match="this predictor is"):
        rows_from_aux(aux, other.metadata_id, "f")
    bad = dict(aux, **{"meta.data": aux["meta.data"][:-8] + "AAAAAAAA"})
    with pytest.raises(MetadataError, match="checksum"):
        rows_from_aux(bad, p.metadata_id, "f")
    with pytest.raises(MetadataError, match="no predictor metadata"):
        rows_from_aux({}, p.metadata_id, "f")


def test_batched_selection_equals_one_by_one(predictor) -> None:
    """Sequences of different lengths (one within budget) selected together, as one engine step
    does per layer, get what each would get alone."""
    cls_name, adapter = predictor.name, predictor.adapter
    preds = [predictor] + [create_predictor(cls_name, SHAPE, SEL, adapter) for _ in range(2)]
    for p, (n, seed) in zip(preds, [(30, 1), (5, 2), (50, 3)]):
        p.append_groups(1, keys(n, seed), values(keys(n, seed)))
    queries = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(4))
    together = select_batch(preds, 1, queries)
    assert [t.tolist() for t in together] == [p.select(1, q).tolist() for p, q in zip(preds, queries)]
    assert together[1].tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(params=[torch.float16, torch.bfloat16])
def score_dtype(request, monkeypatch) -> torch.dtype:
    """Both ways low-rank keys are kept and multiplied (lowrank.SCORE_DTYPE, chosen per CPU)."""
    from kvswap_vllm.predict import lowrank

    monkeypatch.setattr(lowrank, "SCORE_DTYPE", request.param)
    return request.param


def test_headwise_scores_are_each_heads_estimated_attention_mass(score_dtype: torch.dtype) -> None:
    """kvswap: per query head, softmax over tokens of q_lr . k_lr (its KV head's slice of the
    joint basis); a group's score sums its tokens' mass over heads. Keys kept in float16 are
    multiplied in float32; kept in bfloat16, multiplied in bfloat16 (the query too), their
    products rounded to bfloat16 and the softmax in float32."""
    adapter = random_adapter()
    p = create_predictor("kvswap", SHAPE, SelectionConfig(32, 4, key_bits=16), adapter)
    k = keys(12)
    p.append_groups(0, k, values(k))
    q = torch.randn(6, 16)
    a = adapter.joint[0].view(2, 16, -1)
    k_lr = (k.reshape(48, 32) @ adapter.joint[0]).half().to(score_dtype).float()  # (tokens, r) as kept
    bf16 = score_dtype == torch.bfloat16
    mass = torch.zeros(48)
    for h in range(6):
        q_lr = q[h] @ a[h // 3] * 16**-0.5
        logits = k_lr @ (q_lr.bfloat16().float() if bf16 else q_lr)
        mass += torch.softmax(logits.bfloat16().float() if bf16 else logits, dim=0)
    tol = dict(rtol=2e-2, atol=1e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.score(0, q), mass.view(12, 4).sum(dim=1), **tol)
    assert p._rows(0).dtype == score_dtype


def test_hysteresis_keeps_near_ties_and_never_the_clearly_better_new_groups() -> None:
    """Groups attended at the previous step rank `keep_places` places higher; new groups within
    the top (k - keep_places) always win; ties go to the previous groups."""
    from kvswap_vllm.predict.base import top_groups

    scores = torch.arange(20, 0, -1, dtype=torch.float32).unsqueeze(0)  # group i ranks i-th
    top = top_groups(scores, 8, [None], 2)
    assert top[0].tolist() == list(range(8))  # nothing attended before: plain top-k
    # Ranks 0-7 are selected; a previous group ranked 9th (8) moves up 2 places, level with the
    # 7th (6): it wins the tie and displaces the 8th (7). 10th (9) would then be level with
    # the 8th, but 8 has taken a place above it: out, as is 16th (15).
    kept = top_groups(scores, 8, [torch.tensor([8, 9, 15])], 2)[0].tolist()
    assert kept == [0, 1, 2, 3, 4, 5, 6, 8]
    # However many previous groups are close, the top k - places = 6 new groups always stay.
    assert top_groups(scores, 8, [torch.arange(6, 20)], 2)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert top_groups(scores, 8, [torch.arange(8, 20)], 2)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    assert top_groups(scores, 8, [torch.tensor([8, 9, 15])], 0)[0].tolist() == list(range(8))
    assert top_groups(scores, 8, [torch.tensor([7])], 3)[0].tolist() == list(range(8))  # already in: unchanged


def test_hysteresis_selection_equals_ranking_every_group() -> None:
    """top_groups ranks only the k + places best; the same as ranking every group (random
    batches, shorter rows padded with -inf, any previous sets)."""
    from kvswap_vllm.predict.base import top_groups

    g = torch.Generator().manual_seed(3)
    for trial in range(50):
        rows, n, k = 4, 40 + trial, 10
        places = trial % 7 + 1
        scores = torch.randn(rows, n, generator=g)
        scores[1, n - 5:] = float("-inf")  # a shorter sequence of the batch
        previous = [torch.randperm(n - 5, generator=g)[:int(torch.randint(0, 15, (1,), generator=g))]
                    for _ in range(rows)]
        previous[2] = None
        rank = scores.argsort(dim=1, descending=True).argsort(dim=1).float()
        for row, prev in enumerate(previous):
            if prev is not None and len(prev):
                rank[row, prev] -= places + 0.5
        expected = torch.topk(rank, k, dim=1, largest=False).indices.sort(dim=1).values
        assert torch.equal(top_groups(scores, k, previous, places), expected)


def test_hysteresis_reduces_churn_for_every_predictor(predictor) -> None:
    """A query jittering around one direction: with hysteresis, consecutive selections share at
    least as many groups as without (fewer reads), and still contain the top (k - places)."""
    predictor.append_groups(1, keys(60), values(keys(60)))
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 16, generator=g)
    queries = [base + 0.5 * torch.randn(6, 16, generator=g) for _ in range(12)]
    sticky = SelectionConfig(budget_tokens=SEL.budget_tokens, group_size=SEL.group_size, hysteresis=0.25)
    other = create_predictor(predictor.name, SHAPE, sticky, predictor.adapter)
    other.append_groups(1, keys(60), values(keys(60)))

    def overlap(p: object, use_previous: bool) -> int:
        prev, shared = None, 0
        for q in queries:
            sel = p.select(1, q, prev if use_previous else None)
            shared += 0 if prev is None else len(set(sel.tolist()) & set(prev.tolist()))
            prev = sel
        return shared

    assert overlap(other, True) >= overlap(predictor, False)
    if predictor.name not in ("dense", "window"):  # position-only selections never churn
        assert overlap(other, True) > overlap(predictor, False)


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.2"])
def test_bad_hysteresis_is_refused(bad) -> None:
    with pytest.raises(KVSwapError, match="hysteresis"):
        SelectionConfig(budget_tokens=32, group_size=4, hysteresis=bad)


def test_kvswap_with_a_lossless_basis_scores_as_the_oracle(score_dtype: torch.dtype) -> None:
    """With a full-rank basis (A A^T = I) the low-rank keys lose nothing: kvswap's scores are the
    oracle's (exact keys) up to the half precision the low-rank keys are kept in."""
    full = SHAPE.num_kv_heads * SHAPE.head_dim
    lowrank = create_predictor("kvswap", SHAPE, SEL, random_adapter(rank=full))
    oracle = create_predictor("oracle", SHAPE, SEL)
    k = keys(40) * 10
    lowrank.append_groups(0, k, values(k))
    oracle.append_groups(0, k, values(k))
    q = torch.randn(SHAPE.num_q_heads, SHAPE.head_dim, generator=torch.Generator().manual_seed(4))
    exact = oracle.score(0, q)
    assert exact.shape == (40,) and exact.sum() == pytest.approx(SHAPE.num_q_heads, rel=1e-4)
    assert torch.allclose(lowrank.score(0, q), exact, rtol=1e-2, atol=1e-3)


def _dense_and_sparse(rest_rank: int, seed: int = 5):
    """A kvswap predictor with lossless key and value bases over 40 groups; (dense attention of
    a query over all tokens, the selection's attention, the same merged with the rest)."""
    from kvswap_vllm.attention.sparse import decode_attention

    full = SHAPE.num_kv_heads * SHAPE.head_dim
    sel = SelectionConfig(budget_tokens=32, group_size=4, residual_rank=rest_rank)
    p = create_predictor("kvswap", SHAPE, sel, with_value_bases(random_adapter(rank=full), rank=full))
    k, v, q, kk, vv = _attention_inputs(seed)
    p.append_groups(0, k, v)
    ids = p.select(0, q.squeeze(1))
    tokens = _tokens(ids)
    scale = SHAPE.head_dim**-0.5
    dense = decode_attention(q, kk, vv, scale)
    exact = decode_attention(q, kk[:, tokens], vv[:, tokens], scale)
    return p, ids, dense, exact, decode_attention(q, kk[:, tokens], vv[:, tokens], scale, p.rest(0, ids))


def _attention_inputs(seed: int = 5) -> tuple[torch.Tensor, ...]:
    """Keys and values of 40 groups of 4, as groups (40, 4, H, d) and as heads (H, 160, d), and
    a query (Hq, 1, d)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(40, 4, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g)
    v = torch.randn(40, 4, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g)
    q = torch.randn(SHAPE.num_q_heads, SHAPE.head_dim, generator=g).unsqueeze(1)
    kk, vv = (x.reshape(160, SHAPE.num_kv_heads, SHAPE.head_dim).transpose(0, 1) for x in (k, v))
    return k, v, q, kk, vv


def _tokens(ids: torch.Tensor) -> torch.Tensor:
    return (ids.view(-1, 1) * 4 + torch.arange(4)).flatten()


def test_rest_with_lossless_bases_recovers_dense_attention() -> None:
    """With full-rank key and value bases the estimate of the unselected groups is exact (up to
    the half precision rows are kept in): selection + rest = attention over everything."""
    full = SHAPE.num_kv_heads * SHAPE.head_dim
    _, _, dense, exact, merged = _dense_and_sparse(full)
    err_without, err_with = (dense - exact).abs().max(), (dense - merged).abs().max()
    assert err_without > 0.05 and err_with < 0.02 * err_without + 5e-3, (err_without, err_with)


def test_attention_over_blocks_equals_attention_over_them_joined() -> None:
    """decode_attention over (K, V) blocks in any order (the hot tier's slots and the tail, not
    joined) is attention over the joined keys, with and without the estimate of the rest."""
    from kvswap_vllm.attention.sparse import decode_attention

    p, ids, _, exact, merged = _dense_and_sparse(8)
    g = torch.Generator().manual_seed(5)
    _, _, q, kk, vv = _attention_inputs()
    tokens = _tokens(ids)
    scale, rest = SHAPE.head_dim**-0.5, p.rest(0, ids)
    order = torch.randperm(len(tokens), generator=g)  # the slots as they lie
    hot, tail = tokens[order[:-5]], tokens[order[-5:]]
    blocks = lambda x: (x[:, hot], x[:, tail])  # noqa: E731
    assert torch.allclose(decode_attention(q, blocks(kk), blocks(vv), scale), exact, atol=1e-6)
    assert torch.allclose(decode_attention(q, blocks(kk), blocks(vv), scale, rest), merged, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_with_the_rest_in_half_precision_is_the_float32_result(dtype: torch.dtype) -> None:
    """Engines attend in the model's dtype (CUDA: bfloat16 or float16); the rest, estimated in
    float32, merges into that attention at its precision."""
    from kvswap_vllm.attention.sparse import decode_attention

    p, ids, _, exact, merged = _dense_and_sparse(8)
    _, _, q, kk, vv = _attention_inputs()
    tokens = _tokens(ids)
    half = decode_attention(q.to(dtype), kk[:, tokens].to(dtype), vv[:, tokens].to(dtype), SHAPE.head_dim**-0.5,
                            p.rest(0, ids))
    assert half.dtype == dtype
    assert (half.float() - merged).abs().max() < 0.1 * (merged - exact).abs().max() + 2e-2


def test_rest_is_only_of_the_latest_selection_and_none_when_everything_is_selected() -> None:
    p, ids, _, exact, merged = _dense_and_sparse(8)
    assert p.rest(0, ids) is not None and not torch.equal(exact, merged)
    assert p.rest(0, ids[:-1]) is None and p.rest(1, ids) is None  # another selection, a layer never selected
    q = torch.zeros(SHAPE.num_q_heads, SHAPE.head_dim)
    q[:, 0] = 50.0  # another query: another selection replaces the estimate
    again = p.select(0, q)
    assert not torch.equal(again, ids) and p.rest(0, ids) is None and p.rest(0, again) is not None
    prefetch_only = p.select(0, q * 2, rest=False)  # a selection no layer attends to keeps no estimate
    assert p.rest(0, prefetch_only) is None and p.rest(0, again) is None
    small = create_predictor("kvswap", SHAPE, SEL, random_adapter())
    small.append_groups(0, keys(5), values(keys(5)))
    assert small.rest(0, small.select(0, torch.randn(6, 16))) is None  # all 5 groups within the budget


def test_no_residual_keeps_keys_only_and_adapters_without_values_fall_back(caplog) -> None:
    import dataclasses

    adapter = random_adapter()
    off = create_predictor("kvswap", SHAPE, SelectionConfig(32, 4, residual_rank=0), adapter)
    on = create_predictor("kvswap", SHAPE, SEL, adapter)
    assert not off.needs_values and on.needs_values and off.metadata_id != on.metadata_id
    assert off.group_metadata(0, keys(2)).shape == (2, 4, 16)
    assert on.group_metadata(0, keys(2), values(keys(2))).shape == (2, 4, 16 + 8)
    with pytest.raises(ValueError, match="needs the values"):
        on.group_metadata(0, keys(2))
    with pytest.raises(ValueError, match="this predictor keeps 16 \\+ 8"):
        on.import_groups(0, off.group_metadata(0, keys(2)))
    with caplog.at_level("WARNING", logger="kvswap"):
        old = create_predictor("kvswap", SHAPE, SEL, dataclasses.replace(adapter, value=()))
    assert old.value_rank == 0 and "no value bases" in caplog.text
    with pytest.raises(KVSwapError, match="exceeds the adapter's value rank 16"):
        create_predictor("kvswap", SHAPE, SelectionConfig(32, 4, residual_rank=17), adapter)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_residual_rank_is_refused(bad) -> None:
    with pytest.raises(KVSwapError, match="residual_rank"):
        SelectionConfig(budget_tokens=32, group_size=4, residual_rank=bad)


def test_adapter_keeps_its_value_bases(tmp_path: Path) -> None:
    from kvswap_vllm.predict.adapter import has_value_bases

    a = random_adapter()
    a.save(tmp_path / "with")
    b = LowRankAdapter.load(tmp_path / "with", "ab" * 16)
    assert b.value_rank == 16 and all(torch.equal(x, y) for x, y in zip(a.value, b.value))
    assert b.digest == a.digest and has_value_bases(tmp_path / "with")
    import dataclasses

    dataclasses.replace(a, value=()).save(tmp_path / "without")
    c = LowRankAdapter.load(tmp_path / "without", "ab" * 16)
    assert c.value_rank == 0 and c.digest != a.digest and not has_value_bases(tmp_path / "without")
    assert not has_value_bases(tmp_path / "missing")


@pytest.mark.parametrize("when", ["prepared at once", "asked later", "after new groups"])
def test_rest_is_that_of_the_selection_however_late_it_is_computed(when) -> None:
    """Runtimes compute the estimate while the selection's reads are in flight (prepare_rest),
    or rest() computes it on first use; groups flushed in between are not part of that
    selection's rest (the step attends to them exactly, in its tail)."""
    p, ids, _, _, _ = _dense_and_sparse(8)
    reference = p.rest(0, ids)
    g = torch.Generator().manual_seed(5)  # _dense_and_sparse's draws: its keys, values, query
    for shape in ((40, 4, SHAPE.num_kv_heads, SHAPE.head_dim),) * 2 + ((SHAPE.num_q_heads, SHAPE.head_dim),):
        q = torch.randn(*shape, generator=g)
    again = p.select(0, q)  # the same selection, its estimate not computed yet
    assert torch.equal(again, ids)
    if when == "prepared at once":
        p.prepare_rest(0)
    elif when == "after new groups":
        k = torch.randn(2, 4, SHAPE.num_kv_heads, SHAPE.head_dim)
        p.append_groups(0, k, torch.randn_like(k))
    est = p.rest(0, ids)
    assert torch.equal(est.out, reference.out) and torch.equal(est.lse, reference.lse)


@pytest.mark.parametrize("name", ["kvswap", "kvswap-paper"])
def test_key_rank_scores_with_the_leading_basis_columns(name: str) -> None:
    """key_rank r on a rank-16 adapter = an adapter calibrated at rank r (the SVD's leading
    columns), with r numbers per token per layer instead of 16."""
    full, small = random_adapter(16), random_adapter(8)
    cut = create_predictor(name, SHAPE, SelectionConfig(32, 4, key_rank=8), full)
    ref = create_predictor(name, SHAPE, SEL, small)
    whole = create_predictor(name, SHAPE, SEL, full)
    k = keys(20)
    for p in (cut, ref, whole):
        p.append_groups(0, k, values(k))
    q = torch.randn(SHAPE.num_q_heads, SHAPE.head_dim)
    assert torch.equal(cut.score(0, q), ref.score(0, q))
    assert not torch.equal(cut.score(0, q), whole.score(0, q))
    assert cut.metadata_bytes() == ref.metadata_bytes() < whole.metadata_bytes()
    assert cut.metadata_id != whole.metadata_id  # rows of one are refused by the other
    assert cut.adapter is create_predictor(name, SHAPE, SelectionConfig(32, 4, key_rank=8), full).adapter
    above = create_predictor(name, SHAPE, SelectionConfig(32, 4, key_rank=64), full)
    assert above.adapter is full


@pytest.mark.parametrize("bad", [-1, 2.0, True, "32"])
def test_bad_key_rank_is_refused(bad) -> None:
    with pytest.raises(KVSwapError, match="key_rank"):
        SelectionConfig(budget_tokens=32, group_size=4, key_rank=bad)


@pytest.mark.parametrize("name", ["kvswap", "kvswap-paper"])
def test_int8_keys_score_as_their_16_bit_rows_within_rounding(name: str, score_dtype: torch.dtype) -> None:
    """key_bits 8: each token's low-rank key kept as int8 with one float32 scale (its largest
    magnitude / 127); scores are those of the 16-bit rows dequantised, at about half the memory,
    and they select what the 16-bit keys select unless two groups are within rounding."""
    adapter = random_adapter(16)
    wide = create_predictor(name, SHAPE, SelectionConfig(32, 4, key_bits=16), adapter)
    narrow = create_predictor(name, SHAPE, SEL, adapter)  # key_bits 8, the default
    k = keys(40)
    for p in (wide, narrow):
        p.append_groups(0, k, values(k))
    rows16 = wide.group_metadata(0, k, values(k))[..., :16].reshape(160, 16).float()  # float16, as exchanged
    rows8, scale = narrow._rows(0), narrow._lr_scale[0].view()
    assert rows8.dtype == torch.int8 and scale.shape == (160,)
    # the products are those of the dequantised rows: as int8 products to the query's rounding
    # (quantize_int8: at most max|row| / 254 per number, times the keys' magnitudes), else to
    # bfloat16's rounding where used
    from kvswap_vllm.predict.lowrank import INT8_PRODUCTS

    q_lr = torch.randn(3, 16)
    deq = rows8.double() * scale.double().unsqueeze(1)
    exact = q_lr.double() @ deq.T
    got = narrow._logits(0, q_lr).double()
    if INT8_PRODUCTS:
        bound = q_lr.abs().amax(dim=1, keepdim=True).double() / 254 * deq.abs().sum(dim=1) * 1.001 + 1e-6
        assert bool(((got - exact).abs() <= bound).all()) and not torch.equal(got, exact)
    else:
        tol = 2e-4 if score_dtype != torch.bfloat16 else 2e-2
        torch.testing.assert_close(got, exact, rtol=tol, atol=tol * float(exact.abs().max()))
    err = (rows8.float() * scale.unsqueeze(1) - rows16).abs().amax(dim=1)
    assert bool((err <= rows16.abs().amax(dim=1) / 254 * 1.001).all())
    q = torch.randn(SHAPE.num_q_heads, SHAPE.head_dim)
    s16, s8 = wide.score(0, q), narrow.score(0, q)
    assert not torch.equal(s16, s8)
    torch.testing.assert_close(s8, s16, rtol=0.05, atol=0.03 * float(s16.abs().max()))
    overlap = len(set(wide.select(0, q).tolist()) & set(narrow.select(0, q).tolist()))
    assert overlap >= SEL.budget_groups - 1
    # per token, 16 int8 numbers and a float32 scale instead of 16 16-bit numbers
    assert wide.metadata_bytes() - narrow.metadata_bytes() == 160 * (2 * 16 - 16 - 4)
    assert narrow.metadata_id == wide.metadata_id  # files keep float16 rows either way


@pytest.mark.parametrize("scale", [1e-3, 1.0, 40.0])
def test_int8_queries_are_exact_to_a_254th_of_each_rows_largest_number(scale: float) -> None:
    """A query row as int8 (quantize_int8) on its largest magnitude / 127: every number within
    half a step of it; rows of zeros stay zeros."""
    from kvswap_vllm.predict.lowrank import quantize_int8

    q = torch.randn(2, 5, 16) * scale
    q[1, 2] = 0
    q8, s = quantize_int8(q)
    assert q8.dtype == torch.int8 and q8.shape == (2, 5, 16) and s.shape == (2, 5, 1)
    assert int(q8.abs().max()) == 127
    back = s.double() * q8.double()
    err = (back - q.double()).abs().amax(dim=-1)
    assert bool((err <= q.abs().amax(dim=-1).double() / 254 * 1.001).all())
    assert float(err.max()) > 0 and torch.equal(back[1, 2], torch.zeros(16, dtype=torch.float64))


@pytest.mark.skipif(not __import__("kvswap_vllm.predict.lowrank", fromlist=["x"]).INT8_PRODUCTS,
                    reason="torch cannot multiply int8 matrices here")
def test_int8_keys_are_multiplied_as_int8_without_a_converted_copy(monkeypatch) -> None:
    """8-bit keys go to torch._int_mm as kept: scoring allocates no converted copy of them."""
    from kvswap_vllm.predict import lowrank

    p = create_predictor("kvswap", SHAPE, SEL, random_adapter(16))
    k = keys(40)
    p.append_groups(0, k, values(k))
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b, **kw: calls.append((a.dtype, b.dtype)) or real(a, b, **kw))
    monkeypatch.setattr(lowrank, "_scratch", lambda *a: pytest.fail("keys converted for scoring"))
    p.score(0, torch.randn(SHAPE.num_q_heads, SHAPE.head_dim))
    assert calls == [(torch.int8, torch.int8)]


@pytest.mark.parametrize("name", ["kvswap", "kvswap-paper"])
def test_int8_keys_score_the_same_without_int8_products(name: str, monkeypatch) -> None:
    """Where torch cannot multiply int8 matrices (INT8_PRODUCTS False), 8-bit keys are converted
    and multiplied in SCORE_DTYPE: the same scores to that dtype's rounding."""
    from kvswap_vllm.predict import lowrank

    p = create_predictor(name, SHAPE, SEL, random_adapter(16))
    k = keys(40)
    p.append_groups(0, k, values(k))
    q = torch.randn(SHAPE.num_q_heads, SHAPE.head_dim)
    direct = p.score(0, q)
    monkeypatch.setattr(lowrank, "INT8_PRODUCTS", False)
    converted = p.score(0, q)
    tol = 2e-2 if lowrank.SCORE_DTYPE == torch.bfloat16 else 1e-4
    torch.testing.assert_close(converted, direct, rtol=tol, atol=tol * float(direct.abs().max()))


def test_int8_keys_of_a_zero_row_score_zero_not_nan() -> None:
    p = create_predictor("kvswap-paper", SHAPE, SelectionConfig(32, 4, key_bits=8), random_adapter(16))
    p.append_groups(0, torch.zeros(10, 4, SHAPE.num_kv_heads, SHAPE.head_dim))
    assert torch.equal(p.score(0, torch.randn(6, 16)), torch.zeros(10))


@pytest.mark.parametrize("bad", [4, 8.0, True, "8", 32])
def test_bad_key_bits_are_refused(bad) -> None:
    with pytest.raises(KVSwapError, match="key_bits must be 8 or 16"):
        SelectionConfig(budget_tokens=32, group_size=4, key_bits=bad)


def test_selection_buffers_are_reused_and_never_shared() -> None:
    """The low-rank predictors' context-sized transients come from a pool: given back, a buffer
    serves the next selection; held (a selection waiting for its rest estimate), never."""
    from kvswap_vllm.predict.lowrank import _BufferPool

    pool = _BufferPool()
    a = pool.take((3, 100), torch.float32)
    b = pool.take((3, 100), torch.float32)
    assert a.data_ptr() != b.data_ptr()
    pool.give(a)
    pool.give(a)  # twice: still one free buffer
    c, d = pool.take((2, 120), torch.float32), pool.take((2, 120), torch.float32)
    assert c.data_ptr() == a.data_ptr() and d.data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert pool.take((3, 100), torch.bfloat16).dtype == torch.bfloat16
    pool.give(c, d)
    big = pool.take((5, 1000), torch.float32)  # fits in neither: both are dropped
    pool.give(big)
    assert pool.take((3, 100), torch.float32).data_ptr() == big.data_ptr()


def test_rest_estimates_are_the_same_with_reused_buffers() -> None:
    """Two sequences selecting in turn, their estimates pending together (as in a batch), give
    the same estimates as fresh predictors: no buffer is overwritten while a selection holds it."""
    adapter = with_value_bases(random_adapter())
    g = torch.Generator().manual_seed(3)
    seqs = [create_predictor("kvswap", SHAPE, SEL, adapter) for _ in range(2)]
    kv = [torch.randn(2, n, 4, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g) for n in (30, 50)]
    for p, (k, v) in zip(seqs, kv):
        p.append_groups(0, k, v)
    for step in range(3):
        q = torch.randn(2, SHAPE.num_q_heads, SHAPE.head_dim, generator=g)
        ids = [p.select(0, q[i]) for i, p in enumerate(seqs)]  # both pending
        got = [p.rest(0, sel) for p, sel in zip(seqs, ids)]
        for i, (k, v) in enumerate(kv):
            fresh = create_predictor("kvswap", SHAPE, SEL, adapter)
            fresh.append_groups(0, k, v)
            assert torch.equal(fresh.select(0, q[i]), ids[i])
            ref = fresh.rest(0, ids[i])
            assert torch.equal(got[i].out, ref.out) and torch.equal(got[i].lse, ref.lse)


@pytest.mark.parametrize("batch", [1, 3])
def test_kvswap_selects_and_estimates_the_rest_alike_with_and_without_the_c_kernels(batch: int, monkeypatch) -> None:
    """predict/native replaces torch's scoring and rest arithmetic where it builds; the torch path
    stays for machines without a compiler. Both give the same selections, and estimates within
    float32 rounding, over several steps of a batch."""
    from kvswap_vllm.predict import native

    assert native.available()  # the C path, built on this machine (test_native checks the build)
    adapter = with_value_bases(random_adapter())
    g = torch.Generator().manual_seed(11)
    kv = [torch.randn(2, 30 + 7 * i, 4, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g) for i in range(batch)]
    queries = torch.randn(4, batch, SHAPE.num_q_heads, SHAPE.head_dim, generator=g) * 3

    def run() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        seqs = [create_predictor("kvswap", SHAPE, SEL, adapter) for _ in range(batch)]
        for p, (k, v) in zip(seqs, kv):
            p.append_groups(0, k, v)
        out, previous = [], [None] * batch
        for q in queries:
            previous = select_batch(seqs, 0, q, previous)
            out += [(ids, *(lambda r: (r.out, r.lse))(p.rest(0, ids))) for p, ids in zip(seqs, previous)]
        return out

    with_c = run()
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", True)
    assert not native.available()
    for (ids_c, out_c, lse_c), (ids_t, out_t, lse_t) in zip(with_c, run()):
        assert torch.equal(ids_c, ids_t)
        assert torch.allclose(out_c, out_t, rtol=1e-4, atol=1e-5) and torch.allclose(lse_c, lse_t, atol=1e-5)
