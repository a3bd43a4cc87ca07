"""The selection's C kernels (predict/native): built here with the machine's compiler, checked
against the torch arithmetic they replace, and the fallback where they cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from kvswap_vllm.predict import native
from kvswap_vllm.predict.lowrank import MIN_REST_MASS


@pytest.fixture()
def fresh_build(tmp_path, monkeypatch):
    """The kernels' loader as on a new machine: nothing built yet, under a fresh kvswap home."""
    monkeypatch.setenv("KVSWAP_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    return tmp_path


def test_the_kernels_build_here_and_are_cached(fresh_build) -> None:
    # CI's machines have a C compiler (the llama.cpp baseline builds with it), so not building is a failure.
    assert native.available()
    built = list((fresh_build / "native").glob("scoring-*.so"))
    assert len(built) == 1 and not list((fresh_build / "native").glob(".scoring-*"))
    stamp = built[0].stat().st_mtime_ns
    native._lib, native._tried = None, False
    assert native.available() and built[0].stat().st_mtime_ns == stamp  # loaded again, not rebuilt


@pytest.mark.parametrize("cause", ["no compiler", "compiler fails", "turned off"])
def test_without_kernels_selection_falls_back_to_torch_with_a_warning(fresh_build, monkeypatch, caplog, cause) -> None:
    if cause == "no compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
    elif cause == "compiler fails":
        monkeypatch.setattr(native, "_compiler", lambda: "false")
    else:
        monkeypatch.setenv(native.ENV, "0")
    with caplog.at_level(logging.WARNING, logger="kvswap"):
        assert not native.available()
    assert ("selection runs" in caplog.text) == (cause != "turned off")
    assert not list(fresh_build.glob("native/*.so"))


def _torch_scoring(prod, qscale, kscale, g):
    logits = prod * qscale.unsqueeze(1) * kscale
    probs = torch.softmax(logits, -1)
    return probs, torch.logsumexp(logits, -1), probs.sum(0).view(-1, g).sum(1)


@pytest.mark.parametrize("heads,groups,g", [(9, 1750, 4), (3, 37, 4), (1, 5, 8), (6, 1, 1)])
@pytest.mark.parametrize("spread", [0.01, 1.0, 30.0])
def test_scoring_kernel_is_torchs_softmax_and_group_mass(heads: int, groups: int, g: int, spread: float) -> None:
    gen = torch.Generator().manual_seed(heads * groups)
    tokens = groups * g
    prod = torch.randint(-20000, 20000, (heads, tokens), dtype=torch.int32, generator=gen)
    qscale = torch.rand(heads, generator=gen) * spread / 20000
    kscale = torch.rand(tokens, generator=gen) + 0.5
    probs, lse, mass = torch.empty(heads, tokens), torch.empty(heads), torch.empty(groups)
    native.softmax_groups(prod, qscale, kscale, g, probs, lse, mass, torch.empty(tokens))
    want_p, want_lse, want_mass = _torch_scoring(prod.double(), qscale.double(), kscale.double(), g)
    assert torch.allclose(probs.double(), want_p, rtol=2e-5, atol=1e-12)
    assert torch.allclose(lse.double(), want_lse, rtol=0, atol=2e-5 * max(1.0, spread))
    assert torch.allclose(mass.double(), want_mass, rtol=2e-5, atol=1e-12)
    assert torch.allclose(probs.sum(1), torch.ones(heads), atol=1e-5)


def _torch_rest(probs, values, g, groups, lse):
    n = probs.shape[1] // g
    picked = probs.view(-1, n, g)[:, groups].flatten(1)
    chosen = values.view(-1, n, g)[:, groups].flatten(1)
    mass = 1 - picked.sum(-1)
    left, kept = mass > MIN_REST_MASS, mass.clamp_min(MIN_REST_MASS)
    out = (probs @ values.T - picked @ chosen.T) * (left / kept).unsqueeze(-1)
    return out, (lse + kept.log()).masked_fill(~left, float("-inf"))


@pytest.mark.parametrize("selected", ["some", "none", "all"])
def test_rest_kernel_is_the_torch_estimate(selected: str) -> None:
    gen = torch.Generator().manual_seed(3)
    heads, groups, g, rv = 6, 200, 4, 8
    logits = torch.randn(heads, groups * g, generator=gen) * 3
    probs, lse = torch.softmax(logits, -1), torch.logsumexp(logits, -1)
    values = torch.randn(rv, groups * g + 40, generator=gen)[:, :groups * g]  # a view of wider columns
    ids = {"some": torch.randperm(groups, generator=gen)[:50].sort().values,
           "none": torch.empty(0, dtype=torch.int64), "all": torch.arange(groups)}[selected]
    out, rest_lse = torch.empty(heads, rv), torch.empty(heads)
    native.rest(probs, values, g, ids, probs @ values.T, lse, MIN_REST_MASS, out, rest_lse,
                torch.empty((heads + rv) * len(ids) * g))
    want_out, want_lse = _torch_rest(probs, values, g, ids, lse)
    assert torch.allclose(out, want_out, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.isinf(rest_lse), torch.isinf(want_lse))
    if selected == "all":
        assert torch.isinf(rest_lse).all() and not out.any()
    else:
        assert torch.allclose(rest_lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("bad", ["id past the groups", "negative id", "int32 ids", "small scratch", "strided rows"])
def test_rest_kernel_refuses_what_would_read_outside_its_arrays(bad: str) -> None:
    heads, groups, g, rv = 3, 10, 4, 2
    probs, values = torch.full((heads, groups * g), 1 / 40), torch.ones(rv, groups * g)
    ids = torch.tensor([1, 4])
    scratch = torch.empty((heads + rv) * 2 * g)
    if bad == "id past the groups":
        ids = torch.tensor([1, groups])
    elif bad == "negative id":
        ids = torch.tensor([-1, 4])
    elif bad == "int32 ids":
        ids = ids.int()
    elif bad == "small scratch":
        scratch = scratch[:-1]
    else:
        values = torch.ones(groups * g, rv).T
    with pytest.raises(ValueError):
        native.rest(probs, values, g, ids, torch.zeros(heads, rv), torch.zeros(heads), MIN_REST_MASS,
                    torch.empty(heads, rv), torch.empty(heads), scratch)


@pytest.mark.parametrize("places", [0, 3, 25])
@pytest.mark.parametrize("with_previous", [True, False])
def test_top_groups_kernel_ranks_as_the_torch_selection(places: int, with_previous: bool) -> None:
    from kvswap_vllm.predict.base import top_groups

    gen = torch.Generator().manual_seed(places)
    counts, k = [1750, 400, 101, 1000], 100
    scores = torch.full((len(counts), max(counts)), float("-inf"))
    previous = []
    for row, n in enumerate(counts):
        scores[row, :n] = torch.rand(n, generator=gen)
        ids = torch.randperm(n, generator=gen)[:k].sort().values
        previous.append(ids if with_previous and row != 1 else None)  # a row without a previous selection
    got = native.top_groups(scores, counts, k, previous, places)
    assert torch.equal(got, top_groups(scores, k, previous, places))
    assert got.dtype == torch.int64 and (got.diff(dim=1) > 0).all()


def test_top_groups_kernel_favours_previous_ids_in_any_order_and_ignores_those_past_the_row() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert native.top_groups(scores, [6], 2, [None], 2).tolist() == [[0, 1]]
    # 3 and 2 rank 3.5 places higher: 2 -> -1.5, 3 -> -0.5, ahead of 0 (rank 0)
    assert native.top_groups(scores, [6], 2, [torch.tensor([3, 2, 9])], 3).tolist() == [[2, 3]]
    assert native.top_groups(scores, [6], 2, [torch.tensor([3, 2])], 2).tolist() == [[0, 2]]  # 3 -> 0.5
    assert native.top_groups(scores, [6], 2, [torch.tensor([4])], 2).tolist() == [[0, 1]]  # 4 is out of reach


def test_top_groups_kernel_refuses_rows_shorter_than_the_selection() -> None:
    with pytest.raises(ValueError):
        native.top_groups(torch.rand(2, 10), [10, 3], 4, [None, None], 1)
    with pytest.raises(ValueError):
        native.top_groups(torch.rand(1, 10), [11], 4, [None], 1)
