"""Greedy generation with Hugging Face transformers, one prompt at a time."""

from __future__ import annotations

import time

import torch

from kvswap_vllm.generation import GenerationConfig, GenerationResult, Generator

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class HFGenerator(Generator):
    """HF transformers with its default dynamic KV cache in memory."""

    kv_path = "hf: HF transformers, dense (the whole KV cache in memory)"

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {config.dtype!r}; supported: {', '.join(_DTYPES)}")
        torch.manual_seed(config.seed)
        self._tokenizer = AutoTokenizer.from_pretrained(config.model)
        self._model = AutoModelForCausalLM.from_pretrained(config.model, dtype=_DTYPES[config.dtype]).eval()

    @torch.inference_mode()
    def _one(self, prompt: list[int]) -> GenerationResult:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = self._model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        t_first = time.perf_counter()
        generated = [int(token)]
        eos = self._eos_ids()
        while len(generated) < self.config.max_new_tokens and generated[-1] not in eos:
            out = self._model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            generated.append(int(token))
        t_last = time.perf_counter()
        text = self._tokenizer.decode(generated, skip_special_tokens=True)
        return GenerationResult(text, len(prompt), len(generated), t_first - t0, t_last - t_first)

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {int(eos)}

    def generate(self, prompts: list[list[int]]) -> list[GenerationResult]:
        if any(len(p) + self.config.max_new_tokens > self.config.max_model_len for p in prompts):
            raise ValueError(f"a prompt plus max_new_tokens exceeds max_model_len={self.config.max_model_len}")
        return [self._one(p) for p in prompts]
