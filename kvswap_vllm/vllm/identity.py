"""What a stored block is bound to: the model's fingerprint, dtype, block size and parallel layout."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.models.fingerprint import model_fingerprint
from kvswap_vllm.prefetch.policy import decode_io_threads
from kvswap_vllm.store.config import DTYPES, StoreConfig
from kvswap_vllm.store.profiles import get_profile
from kvswap_vllm.vllm.connector_config import ConnectorConfig

log = logging.getLogger("vllm.kvswap")  # under "vllm" so that vLLM's log handlers print it


@dataclass(frozen=True)
class EngineIdentity:
    """Everything two engines must share for one to load the other's blocks."""

    model_fingerprint: str
    dtype: str
    block_size: int
    num_kv_heads: int  # per tensor-parallel rank
    head_dim: int
    num_layers: int
    tp_size: int = 1
    pp_size: int = 1

    @classmethod
    def from_vllm_config(cls, vllm_config: object) -> "EngineIdentity":
        mc = vllm_config.model_config  # type: ignore[attr-defined]
        pc = vllm_config.parallel_config  # type: ignore[attr-defined]
        dtype = str(mc.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise KVSwapError(f"kvswap connector: dtype {dtype} unsupported; supported: {', '.join(DTYPES)}")
        return cls(
            model_fingerprint=fingerprint_of(mc.model, getattr(mc, "revision", None), mc.hf_config),
            dtype=dtype,
            block_size=int(vllm_config.cache_config.block_size),  # type: ignore[attr-defined]
            num_kv_heads=int(mc.get_num_kv_heads(pc)),
            head_dim=int(mc.get_head_size()),
            num_layers=int(mc.get_total_num_hidden_layers()),
            tp_size=int(pc.tensor_parallel_size),
            pp_size=int(pc.pipeline_parallel_size),
        )

    def tenant(self, options: ConnectorConfig, tp_rank: int, pp_rank: int) -> str:
        """Namespace of one rank: each rank stores and loads only its own shard of the KV."""
        return (f"{options.tenant}.{self.dtype}.b{self.block_size}"
                f".tp{tp_rank}of{self.tp_size}.pp{pp_rank}of{self.pp_size}")

    def store_config(self, options: ConnectorConfig, tp_rank: int = 0, pp_rank: int = 0) -> StoreConfig:
        return StoreConfig(
            root=options.root, model_fingerprint=self.model_fingerprint, num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, group_size=self.block_size,
            dtype=self.dtype, tenant=self.tenant(options, tp_rank, pp_rank),
            capacity_bytes=options.capacity_bytes, direct_io=options.direct_io,
        )

    def sparse_store_config(self, options: ConnectorConfig) -> StoreConfig:
        """The disk tier of KVSwap decoding (groups of G tokens, low-rank metadata in the files);
        one rank only (KVSwap decoding runs with TP = PP = 1)."""
        settings = get_profile(options.storage_profile).store_settings()
        settings["io_threads"] = decode_io_threads(settings["io_threads"])
        return StoreConfig(
            root=options.root, model_fingerprint=self.model_fingerprint, num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, group_size=options.group_size,
            dtype=self.dtype, tenant=f"{options.tenant}.kvswap", capacity_bytes=options.capacity_bytes,
            direct_io=options.direct_io, **settings,
        )

    def all_ranks(self) -> list[tuple[int, int]]:
        return [(tp, pp) for pp in range(self.pp_size) for tp in range(self.tp_size)]


def fingerprint_of(model: str, revision: str | None, hf_config: object) -> str:
    """The weights' fingerprint for a local checkpoint; for a hub id whose files are not in a
    local folder, a hash of the id, revision and config (weaker: say so)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        folder = _hub_snapshot(model, revision) or folder
    if folder.is_dir():
        return model_fingerprint(folder)
    log.warning("kvswap connector: %s is not a local folder; the disk tier is keyed by its name, "
                "revision and config, not by its weights", model)
    config = hf_config.to_json_string() if hasattr(hf_config, "to_json_string") else json.dumps(str(hf_config))
    return hashlib.sha256(f"{model}\0{revision}\0{config}".encode()).hexdigest()


def _hub_snapshot(model: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not downloaded, not a hub id, or no hub library: fall back to the name
        return None
