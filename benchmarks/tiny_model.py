"""A random-weight Llama checkpoint with the default model's tokenizer: for contexts beyond the
real model's window (the throughput scale rows) and for tests that need an engine in seconds.

    python -m benchmarks.tiny_model OUT_DIR [--layers 4] [--heads 8] [--kv-heads 2] [--max-positions 40960]
    python -m benchmarks.tiny_model OUT_DIR --like MODEL_DIR   # MODEL_DIR's shape, random weights
    kvswap calibrate --model OUT_DIR        # its low-rank adapter, for the kvswap predictors
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def write_tiny_llama(path: Path, tokenizer_from: Path, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                     max_positions: int = 4096) -> Path:
    """A random-weight Llama small enough to start in seconds, with a real tokenizer."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=32 * heads, intermediate_size=64 * heads,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=32, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True)
    return _save_random(cfg, path, tokenizer_from)


def write_random_like(path: Path, like: Path, max_positions: int | None = None) -> Path:
    """Random weights in the shape of checkpoint `like` (its config and tokenizer): the real
    model's compute and KV size where its weights cannot travel (e.g. to a GPU machine)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(like)
    if max_positions:
        cfg.max_position_embeddings = max_positions
    return _save_random(cfg, path, like)


def _save_random(cfg, path: Path, tokenizer_from: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, path)
    return path


def main(argv: list[str] | None = None) -> int:
    from kvswap_vllm.models.prepare import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=40960)
    p.add_argument("--like", type=Path, default=None,
                   help="checkpoint (or its config + tokenizer files) whose shape to copy, with random weights; "
                   "--layers/--heads/--kv-heads are then ignored")
    args = p.parse_args(argv)
    if args.like is not None:
        write_random_like(args.out, args.like, args.max_positions)
    else:
        write_tiny_llama(args.out, default_model_path(), args.heads, args.kv_heads, args.layers, args.max_positions)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
