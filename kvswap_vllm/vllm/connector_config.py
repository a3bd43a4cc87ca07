"""Options of the `kvswap` KV connector, read from `kv_connector_extra_config` and validated."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.paths import kv_dir
from kvswap_vllm.predict.base import PREDICTORS, SelectionConfig
from kvswap_vllm.prefetch.policy import default_prefetch
from kvswap_vllm.store.profiles import get_profile

CONNECTOR_NAME = "kvswap"


@dataclass(frozen=True)
class ConnectorConfig:
    """What `--kv-transfer-config '{"kv_connector": "kvswap", "kv_connector_extra_config": {...}}'`
    may set. Every key is optional."""

    # Root of the disk tier (default $KVSWAP_HOME/kv); files go under
    # <kv_dir>/kvswap-v<format>/<model fingerprint>/<tenant>.<dtype>.b<block>.tp<r>of<n>.pp<r>of<n>.
    kv_dir: str | None = None
    # Upper bound on the disk tier of this model and tenant, GiB, per rank: beyond it the least
    # recently used block files are deleted. None = unbounded (the disk fills, then saving stops).
    capacity_gb: float | None = 16.0
    # Requests of different tenants never share blocks.
    tenant: str = "default"
    # nvme / ufs / emmc / sd or a `kvswap store probe` JSON: shapes the reads.
    storage_profile: str = "nvme"
    # "auto": O_DIRECT where the file system accepts it; "on" requires it; "off" = buffered.
    direct_io: str = "auto"
    # Save blocks filled by decoding too (not only prompt blocks).
    save_decode: bool = True
    # KVSwap decoding inside vLLM: None = off (vLLM attends densely to its own paged cache, and
    # the disk tier serves prefixes); a predictor name = each decode step attends to the
    # `budget_tokens` tokens of groups of `group_size` tokens that the predictor selects, plus
    # the tail, with the KV in the disk tier and vLLM's blocks only logical.
    predictor: str | None = None
    budget_tokens: int = 400
    group_size: int = 4
    # Memory of the hot tier of all running requests together, MiB; when set, it decides M
    # (budget_tokens is then ignored): M = hot_tier_mb / (max_num_seqs x one token's KV over all
    # layers, + one staging layer), in whole groups. The worker refuses to start if that is
    # less than one group.
    hot_tier_mb: float | None = None
    # reuse=false (ablation) reads every selected group again each step.
    reuse: bool = True
    # Layer-ahead and step-start prefetch; false: each layer selects from its own query when it
    # runs, its reads on the critical path. Unset: on where needed (reselect false), else off:
    # KVSwap decoding in vLLM runs on the CPU backend, where prefetching costs more than it
    # hides (prefetch.pipeline.default_prefetch has the measurement).
    prefetch: bool | None = None
    # Each layer selects again from its own query and reads what the layer-ahead prediction
    # missed (exact selection; the prediction is a prefetch). false: attend to the prediction,
    # as the paper does (fewer reads on the critical path, lower quality).
    reselect: bool = True
    # Groups attended at a layer's previous step rank this share of budget_tokens / group_size
    # places higher in its next selection (fewer reads for near-ties; see SelectionConfig).
    hysteresis: float = SelectionConfig.hysteresis
    # Rank of the low-rank values with which `kvswap` estimates the attention to the groups it
    # leaves out (SelectionConfig.residual_rank); 0 = attend to the selection alone.
    residual_rank: int = SelectionConfig.residual_rank
    # Numbers per token per layer of the low-rank keys (SelectionConfig.key_rank); 0 = the
    # adapter's rank.
    key_rank: int = SelectionConfig.key_rank
    # Bits per number of the low-rank keys in memory, 16 or 8 (SelectionConfig.key_bits).
    key_bits: int = SelectionConfig.key_bits
    # Benchmarks: KVSwap decoding's reads wait as long as `storage_profile`'s device would take
    # (its bandwidth and per-request latency), so a fast disk stands in for an eMMC or SD card.
    throttle_reads: bool = False

    def __post_init__(self) -> None:
        if self.capacity_gb is not None and (not _is_number(self.capacity_gb) or self.capacity_gb <= 0):
            raise KVSwapError(f"kvswap connector: capacity_gb must be a positive number, got {self.capacity_gb!r}")
        for name in ("budget_tokens", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KVSwapError(f"kvswap connector: {name} must be a positive integer, got {value!r}")
        try:
            SelectionConfig(group_size=1, budget_tokens=1, hysteresis=self.hysteresis, residual_rank=self.residual_rank,
                            key_rank=self.key_rank, key_bits=self.key_bits)
        except KVSwapError as exc:
            raise KVSwapError(f"kvswap connector: {exc}") from exc
        if self.hot_tier_mb is not None and (not _is_number(self.hot_tier_mb) or self.hot_tier_mb <= 0):
            raise KVSwapError(f"kvswap connector: hot_tier_mb must be a positive number, got {self.hot_tier_mb!r}")
        if self.predictor == "none":
            object.__setattr__(self, "predictor", None)
        if self.predictor is not None and self.predictor not in PREDICTORS:
            raise KVSwapError(f"kvswap connector: unknown predictor {self.predictor!r}; "
                              f"supported: {', '.join(sorted(PREDICTORS))}")
        if self.direct_io not in ("auto", "on", "off"):
            raise KVSwapError(f"kvswap connector: direct_io must be 'auto', 'on' or 'off', got {self.direct_io!r}")
        if self.prefetch is None:
            object.__setattr__(self, "prefetch", default_prefetch(self.reselect is True))
        for name in ("save_decode", "reuse", "prefetch", "reselect", "throttle_reads"):
            if not isinstance(getattr(self, name), bool):
                raise KVSwapError(f"kvswap connector: {name} must be true or false, got {getattr(self, name)!r}")
        try:
            get_profile(self.storage_profile)
        except KVSwapError as exc:
            raise KVSwapError(f"kvswap connector: {exc}") from exc

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "ConnectorConfig":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise KVSwapError(f"kvswap connector: unknown option(s) {', '.join(unknown)} in "
                              f"kv_connector_extra_config; valid: {', '.join(sorted(known))}")
        return cls(**extra)

    @property
    def sparse(self) -> bool:
        """KVSwap decoding inside vLLM is on."""
        return self.predictor is not None

    def tokens_per_layer(self, token_bytes: int, num_layers: int, max_num_seqs: int) -> int:
        """M: `budget_tokens`, or what `hot_tier_mb` affords each of `max_num_seqs` requests
        (`token_bytes`: K+V of one token in one layer; the hot tier holds M tokens per layer,
        plus one layer's staging buffer)."""
        if self.hot_tier_mb is None:
            return self.budget_tokens
        from kvswap_vllm.hot.tier import budget_tokens_for

        return budget_tokens_for(self.hot_tier_mb, token_bytes, num_layers, max_num_seqs, self.group_size,
                                 "kvswap connector: hot_tier_mb (lower --max-num-seqs or raise it)")

    @property
    def root(self) -> Path:
        return Path(self.kv_dir).expanduser() if self.kv_dir else kv_dir()

    @property
    def capacity_bytes(self) -> int | None:
        return None if self.capacity_gb is None else int(self.capacity_gb * (1 << 30))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
