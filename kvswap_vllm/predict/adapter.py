"""The low-rank adapter: per layer, SVD bases of post-RoPE keys and of values, bound to one model.

Key bases, two per layer, same metadata size per token (`rank` numbers):
- joint: (num_kv_heads * head_dim, rank), all KV heads concatenated (the paper's A_l);
- per_head: (num_kv_heads, head_dim, rank // num_kv_heads), one basis per KV head.
Value basis, one per layer: value: (num_kv_heads * head_dim, rank), all KV heads concatenated;
its leading columns give the low-rank values with which `kvswap` estimates the attention the
selection leaves out (predict/lowrank.py). Adapters written before it have none (`value` empty).
Saved as safetensors (tensors) + JSON (metadata, model fingerprint).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from kvswap_vllm import __version__
from kvswap_vllm.errors import KVSwapError

ADAPTER_FORMAT = 1


class AdapterError(KVSwapError):
    """An adapter file is missing, damaged, or belongs to another model."""


@dataclass(frozen=True)
class LowRankAdapter:
    """Projection bases of one model; tensors are float32."""

    model_fingerprint: str
    num_kv_heads: int
    head_dim: int
    rank: int
    # Per layer: (num_kv_heads * head_dim, rank).
    joint: tuple[torch.Tensor, ...]
    # Per layer: (num_kv_heads, head_dim, rank // num_kv_heads).
    per_head: tuple[torch.Tensor, ...]
    meta: dict = field(default_factory=dict)
    # Per layer: (num_kv_heads * head_dim, value_rank); empty: calibrated without values.
    value: tuple[torch.Tensor, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.joint)

    @property
    def per_head_rank(self) -> int:
        return int(self.per_head[0].shape[-1])

    @property
    def value_rank(self) -> int:
        """Columns of the value bases (0: none)."""
        return int(self.value[0].shape[-1]) if self.value else 0

    @functools.cached_property
    def digest(self) -> str:
        """Identifies the bases: low-rank rows projected with other bases are not comparable."""
        h = hashlib.sha256()
        for t in (*self.joint, *self.value):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def leading(self, rank: int) -> "LowRankAdapter":
        """The same adapter with its key bases cut to their `rank` leading columns: an SVD basis's
        columns come in order of energy, so this is the rank-`rank` calibration, and one adapter
        serves every smaller key rank. At or above the adapter's rank: the adapter itself."""
        if rank >= self.rank:
            return self
        cache = self.__dict__.setdefault("_leading", {})  # per rank: every sequence shares one
        if rank not in cache:
            r_h = max(1, rank // self.num_kv_heads)
            cache[rank] = replace(self, rank=rank, joint=tuple(j[:, :rank].contiguous() for j in self.joint),
                                  per_head=tuple(p[..., :r_h].contiguous() for p in self.per_head),
                                  meta={**self.meta, "cut_from_rank": self.rank})
        return cache[rank]

    def save(self, path: Path) -> None:
        """Write `<path>.safetensors` and `<path>.json` atomically."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"joint.{i}": t.contiguous() for i, t in enumerate(self.joint)}
        tensors.update({f"per_head.{i}": t.contiguous() for i, t in enumerate(self.per_head)})
        tensors.update({f"value.{i}": t.contiguous() for i, t in enumerate(self.value)})
        meta = {**self.meta, "format": ADAPTER_FORMAT, "model_fingerprint": self.model_fingerprint,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "rank": self.rank,
                "num_layers": self.num_layers, "kvswap_version": __version__}
        st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
        save_file(tensors, str(st) + ".tmp", metadata={"model_fingerprint": self.model_fingerprint})
        js_tmp = Path(str(js) + ".tmp")
        js_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(str(st) + ".tmp", st)
        os.replace(js_tmp, js)

    @classmethod
    def load(cls, path: Path, model_fingerprint: str | None = None) -> "LowRankAdapter":
        """Read an adapter; refuse one calibrated for another model."""
        from safetensors.torch import load_file

        st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
        try:
            meta = json.loads(js.read_text())
            tensors = load_file(str(st))
        except FileNotFoundError as exc:
            raise AdapterError(f"no low-rank adapter at {st} (run: kvswap calibrate --model ...)") from exc
        except Exception as exc:
            raise AdapterError(f"damaged low-rank adapter {path}: {exc}") from exc
        if meta.get("format") != ADAPTER_FORMAT:
            raise AdapterError(f"{js}: adapter format {meta.get('format')!r}, this kvswap reads {ADAPTER_FORMAT}")
        if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
            raise AdapterError(
                f"adapter {st.name} was calibrated for model {meta['model_fingerprint'][:16]}..., not for "
                f"{model_fingerprint[:16]}...; run: kvswap calibrate --model <this model>"
            )
        n = meta["num_layers"]
        try:
            joint = tuple(tensors[f"joint.{i}"] for i in range(n))
            per_head = tuple(tensors[f"per_head.{i}"] for i in range(n))
            # All layers or none: an adapter from before value bases has none.
            value = tuple(tensors[f"value.{i}"] for i in range(n)) if "value.0" in tensors else ()
        except KeyError as exc:
            raise AdapterError(f"damaged low-rank adapter {st}: missing {exc}") from exc
        return cls(meta["model_fingerprint"], meta["num_kv_heads"], meta["head_dim"], meta["rank"],
                   joint, per_head, meta, value)


def adapter_for(predictor: str, model_fingerprint: str, head_dim: int, path: Path | None = None) -> "LowRankAdapter | None":
    """The adapter `predictor` needs (the model's default one unless `path`), or None."""
    from kvswap_vllm.predict.base import predictor_class

    if not predictor_class(predictor).needs_adapter:
        return None
    return LowRankAdapter.load(path or default_adapter_path(model_fingerprint, head_dim), model_fingerprint)


def has_value_bases(path: Path) -> bool:
    """Whether the adapter at `path` has value bases (False when it cannot be read either)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path.with_suffix(".safetensors")), "pt") as f:
            return "value.0" in f.keys()
    except Exception:
        return False


def default_adapter_path(model_fingerprint: str, rank: int) -> Path:
    from kvswap_vllm.paths import kvswap_home

    return kvswap_home() / "adapters" / model_fingerprint[:32] / f"rank{rank}"


def joint_basis(rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """rows: (tokens, num_kv_heads, head_dim) -> the top `rank` right singular vectors of all
    heads concatenated, (H * d, rank), and the share of the energy they keep."""
    t, h, d = rows.shape
    _, s, vh = torch.linalg.svd(rows.reshape(t, h * d).double(), full_matrices=False)
    return vh[:rank].T.float(), float((s[:rank] ** 2).sum() / (s**2).sum())


def _bases(keys: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """keys: (tokens, num_kv_heads, head_dim) -> joint basis, per-head bases, energy kept."""
    h = keys.shape[1]
    joint, energy = joint_basis(keys, rank)
    r_h = max(1, rank // h)
    per_head = torch.stack([torch.linalg.svd(keys[:, i].double(), full_matrices=False)[2][:r_h].T
                            for i in range(h)]).float()
    return joint, per_head, energy


def calibrate(model_dir: Path, texts: Sequence[str], rank: int | None = None, max_tokens: int = 8192,
              chunk_tokens: int = 1024, text_source: str = "") -> LowRankAdapter:
    """Run the model over `texts` (up to `max_tokens`), collect post-RoPE keys, take SVDs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvswap_vllm.models.fingerprint import model_fingerprint

    config = AutoConfig.from_pretrained(model_dir)
    h = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rank = rank or d
    if not 1 <= rank <= h * d:
        raise KVSwapError(f"--rank must be within [1, {h * d}] for this model, got {rank}")
    if rank < h:
        raise KVSwapError(f"--rank must be >= the number of KV heads ({h}) so each head keeps a dimension")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[:, :max_tokens]
    limit = min(max_tokens, getattr(config, "max_position_embeddings", max_tokens))
    ids = ids[:, :limit]
    if ids.shape[1] < 2 * rank:
        raise KVSwapError(f"calibration text too short: {ids.shape[1]} tokens, need >= {2 * rank}")
    cache = DynamicCache(config=config)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, ids.shape[1], chunk_tokens):
            model(input_ids=ids[:, start:start + chunk_tokens], past_key_values=cache, use_cache=True)
            done = min(ids.shape[1], start + chunk_tokens)
            print(f"\rkvswap: calibrate: {done}/{ids.shape[1]} tokens through the model", end="",
                  file=sys.stderr, flush=True)
    print(file=sys.stderr)
    joint, per_head, energy, value, value_energy = [], [], [], [], []
    for i, layer in enumerate(cache.layers):
        keys = layer.keys[0].transpose(0, 1)  # (tokens, heads, head_dim), post-RoPE
        j, p, e = _bases(keys, rank)
        joint.append(j)
        per_head.append(p)
        energy.append(round(e, 4))
        v, e = joint_basis(layer.values[0].transpose(0, 1), rank)
        value.append(v)
        value_energy.append(round(e, 4))
        print(f"\rkvswap: calibrate: SVD of layer {i + 1}/{len(cache.layers)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    meta = {"calibration_tokens": int(ids.shape[1]), "text_source": text_source,
            "joint_energy_kept": energy, "value_energy_kept": value_energy,
            "seconds": round(time.perf_counter() - t0, 1)}
    return LowRankAdapter(model_fingerprint(model_dir), h, d, rank, tuple(joint), tuple(per_head), meta,
                          tuple(value))
