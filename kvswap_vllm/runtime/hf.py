"""Greedy generation with Hugging Face transformers, one prompt at a time: KVSwap with the KV
cache on disk (the default), or HF's own dense in-memory cache (predictor None)."""

from __future__ import annotations

import time

import torch

from kvswap_vllm.generation import GenerationConfig, GenerationResult, Generator, KVSwapOptions, given_selection_options

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class HFGenerator(Generator):
    """HF transformers; KVSwap decoding from the disk tier unless the predictor is None."""

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {config.dtype!r}; supported: {', '.join(_DTYPES)}")
        torch.manual_seed(config.seed)
        self._tokenizer = AutoTokenizer.from_pretrained(config.model)
        self._model = AutoModelForCausalLM.from_pretrained(config.model, dtype=_DTYPES[config.dtype])
        self._model.to(config.device).eval()
        opts = config.kvswap or KVSwapOptions(predictor=None)
        self._runtime = None
        if opts.predictor is None:
            self.kv_path = f"hf: HF transformers, dense (the whole KV cache in {config.device} memory)"
        else:
            self._runtime, self._store = self._kvswap_runtime(opts)
            self.kv_path = (f"hf: KVSwap, KV cache on disk ({self._store.config.root}); predictor {opts.predictor}, "
                            f"M={self._runtime.config.selection.budget_tokens} tokens, G={opts.group_size}, "
                            f"hot tier on {config.device}, "
                            f"prefetch {'on' if self._runtime.config.prefetch else 'off'}"
                            + (f", storage profile {opts.storage_profile}" if opts.storage_profile else ""))

    def _kvswap_runtime(self, opts: KVSwapOptions):
        from kvswap_vllm.hot.tier import budget_tokens_for
        from kvswap_vllm.models.fingerprint import model_fingerprint
        from kvswap_vllm.paths import kv_dir
        from kvswap_vllm.predict.adapter import adapter_for
        from kvswap_vllm.predict.base import SelectionConfig
        from kvswap_vllm.prefetch.policy import decode_io_threads, default_prefetch
        from kvswap_vllm.runtime.hf_disk import DiskRuntimeConfig, KVSwapDisk
        from kvswap_vllm.runtime.hf_kvswap import model_shape
        from kvswap_vllm.store import DiskStore, StoreConfig
        from kvswap_vllm.store.profiles import get_profile

        shape = model_shape(self._model.config)
        fp = model_fingerprint(self.config.model)
        adapter = adapter_for(opts.predictor, fp, shape.head_dim, opts.adapter)
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self._model.dtype]
        profile = get_profile(opts.storage_profile) if opts.storage_profile else None
        settings = profile.store_settings() if profile else {}
        settings["io_threads"] = decode_io_threads(settings.get("io_threads", StoreConfig.io_threads))
        store = DiskStore(StoreConfig(root=opts.kv_dir or kv_dir(), model_fingerprint=fp, num_layers=shape.num_layers,
                                      num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                                      group_size=opts.group_size, dtype=dtype, **settings),
                          throttle=profile.throttle() if profile else None)
        budget = opts.budget_tokens
        if opts.hot_tier_mb is not None:
            budget = budget_tokens_for(opts.hot_tier_mb, shape.token_bytes(self._model.dtype.itemsize), shape.num_layers,
                                       1, opts.group_size, "--budget-mb")
        selection = SelectionConfig(budget_tokens=budget, group_size=opts.group_size, **given_selection_options(opts))
        if opts.predictor == "dense":
            selection = SelectionConfig(budget_tokens=self.config.max_model_len, group_size=opts.group_size)
        prefetch = default_prefetch(True, self.config.device) if opts.prefetch is None else opts.prefetch
        config = DiskRuntimeConfig(selection, opts.predictor, prefetch=prefetch)
        return KVSwapDisk(self._model, store, config, adapter), store

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        if eos is None or self.config.ignore_eos:
            return set()
        return set(eos) if isinstance(eos, list) else {int(eos)}

    @torch.inference_mode()
    def _dense(self, prompt: list[int]) -> GenerationResult:
        ids = torch.tensor([prompt], device=self._model.device)
        t0 = time.perf_counter()
        out = self._model(input_ids=ids, use_cache=True, logits_to_keep=1)
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

    def _kvswap(self, prompt: list[int]) -> GenerationResult:
        from kvswap_vllm.resources import trim_heap
        from kvswap_vllm.runtime.hf_disk import generate

        tokens, info = generate(self._model, self._runtime, prompt, self.config.max_new_tokens, self._eos_ids())
        self._runtime.current.close()
        self._runtime.current = None
        trim_heap()  # what the finished sequence held goes back to the OS now
        extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()
                 if k not in ("ttft_s", "decode_s")}
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerationResult(text, len(prompt), len(tokens), info["ttft_s"], info["decode_s"], extra)

    def generate(self, prompts: list[list[int]]) -> list[GenerationResult]:
        if any(len(p) + self.config.max_new_tokens > self.config.max_model_len for p in prompts):
            raise ValueError(f"a prompt plus max_new_tokens exceeds max_model_len={self.config.max_model_len}")
        one = self._dense if self._runtime is None else self._kvswap
        return [one(p) for p in prompts]

    def close(self) -> None:
        if self._runtime is not None:
            if self._runtime.current is not None:
                self._runtime.current.close()
            self._store.close()
            self._runtime = None
