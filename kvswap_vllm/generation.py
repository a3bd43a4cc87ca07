"""Engine-neutral generation: prompts in, texts and timings out; engines are looked up by name."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

#: Engine name -> "module:Class"; imported lazily so `kvswap --help` does not load vLLM.
ENGINES: dict[str, str] = {
    "vllm": "kvswap_vllm.vllm.offline:VllmGenerator",
    "hf": "kvswap_vllm.runtime.hf:HFGenerator",
}


@dataclass(frozen=True)
class GenerationConfig:
    """Settings shared by every engine."""

    # Checkpoint folder (Hugging Face layout).
    model: Path
    max_new_tokens: int = 32
    # Generate exactly max_new_tokens tokens, past any end-of-sequence token (benchmarks: every
    # system then decodes the same number of steps, as vLLM's ignore_eos).
    ignore_eos: bool = False
    # "float32" on CPUs without native bf16; "auto" keeps the checkpoint's dtype.
    dtype: str = "float32"
    # Longest prompt + generation the engine must accept.
    max_model_len: int = 8192
    seed: int = 0
    # Where the model runs (engines that take a device: hf): "cpu", "cuda" or "cuda:N". On a
    # GPU, KVSwap's hot tier and tail are in GPU memory; the disk tier and metadata are host-side.
    device: str = "cpu"
    # KVSwap settings (engines that run KVSwap; stock engines ignore them and say so).
    kvswap: "KVSwapOptions | None" = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_model_len < 16:
            raise ValueError(f"max_model_len must be >= 16, got {self.max_model_len}")
        check_device(self.device)


def check_device(device: str) -> None:
    """Refuse a device name torch does not know, or a GPU this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available to torch {torch.__version__} here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


#: KVSwapOptions fields that are SelectionConfig's of the same name (None = its default): every
#: engine passes the ones given on as they are.
SELECTION_OPTIONS = ("hysteresis", "residual_rank", "key_rank", "key_bits")


@dataclass(frozen=True)
class KVSwapOptions:
    """How KVSwap decodes: predictor, budget, groups, where the disk tier lives."""

    # "kvswap", "kvswap-paper", "quest", "window", "dense"; None = the engine's own dense KV cache.
    predictor: str | None = "kvswap"
    # M: tokens of groups each layer attends to per step (plus the rolling tail).
    budget_tokens: int = 400
    # G: tokens per group (one disk request).
    group_size: int = 4
    # Hot tier of one sequence (all layers), MiB: when set, it decides M (budget_tokens ignored).
    hot_tier_mb: float | None = None
    # Disk tier root; None = ~/.cache/kvswap/kv.
    kv_dir: Path | None = None
    # Built-in profile name or probe JSON: throttles reads to that device (benchmarks).
    storage_profile: str | None = None
    # Low-rank adapter path (without suffix); None = the default one for the model.
    adapter: Path | None = None
    # Layer-ahead and step-start prefetch; None = where it pays (on a GPU; see
    # kvswap_vllm/prefetch/policy.py).
    prefetch: bool | None = None
    # Groups attended at the previous step rank this share of M/G places higher (fewer reads
    # for near-ties); None = predict.base.SelectionConfig's default.
    hysteresis: float | None = None
    # Rank of the low-rank values `kvswap` estimates the unselected groups' attention with (0 =
    # none); None = SelectionConfig's default.
    residual_rank: int | None = None
    # Low-rank predictors: numbers per token per layer of the low-rank keys (the adapter's leading
    # basis columns; 0 = all of them); None = SelectionConfig's default.
    key_rank: int | None = None
    # Low-rank predictors: bits per number of the low-rank keys in memory (16 or 8); None =
    # SelectionConfig's default.
    key_bits: int | None = None
    # vLLM engine: keep every full block in the disk tier through the `kvswap` KV connector and
    # load a prefix found there instead of recomputing it (also after a restart).
    prefix_tier: bool = True


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's output and timings (seconds)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    # Time to first token: queueing + prefill.
    ttft_s: float
    # Time from the first to the last generated token.
    decode_s: float
    # Engine-specific counters (KVSwap: reuse rate, bytes read, hot tier and metadata bytes).
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class Generator(ABC):
    """A loaded engine that generates greedily from chat prompts."""

    #: Short description of the KV path this engine runs, printed with every result.
    kv_path: str

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config

    @abstractmethod
    def generate(self, prompts: list[list[int]]) -> list[GenerationResult]:
        """Greedy generation for each token-id prompt, in order."""

    def close(self) -> None:
        """Release the engine (processes, memory)."""

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_generator(engine: str, config: GenerationConfig) -> Generator:
    """Instantiate the engine registered under `engine`."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; supported: {', '.join(sorted(ENGINES))}")
    module_name, cls_name = ENGINES[engine].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(config)


def chat_prompt_ids(model: Path, user_text: str) -> list[int]:
    """Token ids of `user_text` wrapped in the model's chat template, ready to generate from."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": user_text}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(user_text).input_ids


def given_selection_options(kv: "KVSwapOptions") -> dict:
    """The SELECTION_OPTIONS that `kv` sets (not None), by name."""
    return {name: getattr(kv, name) for name in SELECTION_OPTIONS if getattr(kv, name) is not None}
