"""Benchmarks: each writes its result as JSON (and some a PNG beside it)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(result: dict, out: Path | None) -> str:
    """The result as indented JSON, written to `out` (folders created) when given."""
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


def kv_bytes_per_token(model: Path) -> int:
    """K+V bytes of one token over all layers, fp32, from the checkpoint's config."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2 * 4
