"""KVSwap selection on the real default model: calibration, and a passkey found at M = 400."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvswap_vllm.demo_document import build_document, entries_for_tokens
from kvswap_vllm.predict.base import SelectionConfig
from tests.helpers import run_kvswap

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_path(default_model: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "rank64"
    res = run_kvswap("calibrate", "--model", str(default_model), "--tokens", "1024", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"rank": 64' in res.stdout and '"per_head_rank": 21' in res.stdout
    return out


def test_calibrate_refuses_bad_rank(default_model: Path, tmp_path: Path) -> None:
    res = run_kvswap("calibrate", "--model", str(default_model), "--rank", "999", "--out", str(tmp_path / "a"))
    assert res.returncode == 2 and "--rank must be within [1, 192]" in res.stderr


def test_adapter_of_another_model_is_refused(adapter_path: Path) -> None:
    from kvswap_vllm.predict.adapter import AdapterError, LowRankAdapter

    with pytest.raises(AdapterError, match="calibrated for model"):
        LowRankAdapter.load(adapter_path, "0" * 64)


@pytest.mark.parametrize("predictor", ["kvswap", "kvswap-paper"])
@torch.inference_mode()
def test_passkey_found_with_400_token_budget(predictor: str, adapter_path: Path, default_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvswap_vllm.models.fingerprint import model_fingerprint
    from kvswap_vllm.predict.adapter import LowRankAdapter
    from kvswap_vllm.runtime.hf_kvswap import KVSwapReference

    tok = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    adapter = LowRankAdapter.load(adapter_path, model_fingerprint(default_model))
    ref = KVSwapReference(model, predictor, SelectionConfig(400, 4), adapter, measure_recall=True)
    doc = build_document(entries_for_tokens(2000), depth=0.3, seed=7)
    text = tok.apply_chat_template([{"role": "user", "content": doc.prompt()}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.shape[1] > 1500  # the budget covers well under a third of the context
    ref.start_sequence()
    ref.sparse = False
    past = model(input_ids=ids[:, :-16], use_cache=True).past_key_values
    ref.sparse = True
    for t in ids[0, -16:]:
        out = model(input_ids=t.view(1, 1), past_key_values=past, use_cache=True)
        past = out.past_key_values
    generated = []
    for _ in range(14):
        nxt = out.logits[0, -1].argmax()
        generated.append(int(nxt))
        out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
        past = out.past_key_values
    answer = tok.decode(generated)
    assert doc.is_correct(answer), answer
    recall = ref.stats.recall()
    assert sum(recall[2:]) / len(recall[2:]) > 0.8


@torch.inference_mode()
def test_the_estimate_of_the_rest_brings_decoding_closer_to_dense(adapter_path: Path, default_model: Path) -> None:
    """Teacher-forced over natural text at a budget far below the context, kvswap with its
    estimate of the unselected groups' attention (rank-8 low-rank values, the default) predicts
    closer to dense attention than the selection alone: lower KL divergence from dense."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvswap_vllm.models.fingerprint import model_fingerprint
    from kvswap_vllm.predict.adapter import LowRankAdapter
    from kvswap_vllm.predict.calibration_text import stdlib_docstrings
    from kvswap_vllm.runtime.hf_kvswap import KVSwapReference

    tok = AutoTokenizer.from_pretrained(default_model)
    adapter = LowRankAdapter.load(adapter_path, model_fingerprint(default_model))
    assert adapter.value_rank == 64  # calibration keeps value bases beside the key bases
    text = stdlib_docstrings(max_chars=400_000)[300_000:]  # past the calibration text's first 1024 tokens
    ids = tok(text, return_tensors="pt").input_ids[:, :1600]
    logprobs = {}
    for name, rank in (("dense", None), ("selection", 0), ("with rest", 8)):
        model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
        ref = KVSwapReference(model, "dense" if rank is None else "kvswap",
                              SelectionConfig(128, 4, residual_rank=rank or 0), adapter)
        ref.start_sequence()
        ref.sparse = False
        past = model(input_ids=ids[:, :1568], use_cache=True).past_key_values
        ref.sparse = True
        steps = []
        for t in ids[0, 1568:]:
            out = model(input_ids=t.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(torch.log_softmax(out.logits[0, -1], dim=-1))
        logprobs[name] = torch.stack(steps)
    kl = {name: float(torch.nn.functional.kl_div(lp, logprobs["dense"], log_target=True, reduction="batchmean"))
          for name, lp in logprobs.items() if name != "dense"}
    assert kl["with rest"] < 0.8 * kl["selection"], kl
