from __future__ import annotations

import pytest

from kvswap_vllm.demo_document import build_document, entries_for_tokens


def test_deterministic_and_answer_present_once_per_mention() -> None:
    a, b = build_document(), build_document()
    assert a == b
    assert a.text.count(a.answer) == 2  # "... is KEY. Remember it: KEY."
    assert a.question in a.prompt() and a.is_correct(f"it is {a.answer}") and not a.is_correct("12")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_fact_depth(depth: float) -> None:
    doc = build_document(num_entries=100, depth=depth)
    lines = doc.text.splitlines()[2:]
    pos = next(i for i, line in enumerate(lines) if doc.answer in line)
    assert pos == round(depth * 100)


def test_length_scales_with_tokens(default_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    for target in (1000, 3500):
        n = len(tok(build_document(entries_for_tokens(target)).prompt()).input_ids)
        assert 0.8 * target < n < 1.2 * target


@pytest.mark.parametrize("kwargs", [{"num_entries": 0}, {"depth": 1.5}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_document(**kwargs)
