"""The disk tier's configuration: one frozen, validated dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvswap_vllm.store.errors import StoreError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class StoreConfig:
    """Where and how the KV cache of one model is kept on disk."""

    # Root folder of the tier; created 0700; must not be a symlink or writable by others.
    root: Path
    # Identifies the model (weights + config); files of another fingerprint are refused.
    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # Tokens per group: one group is one disk request holding K and V of all KV heads.
    group_size: int = 4
    dtype: str = "float32"
    # Tenant namespace: tenants never see each other's files.
    tenant: str = "default"
    # Upper bound on bytes of block files under this model's namespace; None = unbounded.
    capacity_bytes: int | None = None
    # "auto": O_DIRECT where the file system accepts it, else buffered + POSIX_FADV_DONTNEED.
    direct_io: str = "auto"
    # Reads in flight at once (threads issuing preadv).
    io_threads: int = 8
    # O_DIRECT reads of one call go to the kernel together (Linux AIO: one system call for all,
    # no thread or Python per read; see store/aio.py) where the kernel offers it; so do buffered
    # reads of a disk tier in memory (tmpfs). False, for buffered reads from a device, or under
    # a throttle: io_threads threads issue them one by one.
    kernel_aio: bool = True
    # One read per run of adjacent groups; False = one read per group (benchmarks compare both).
    coalesce_reads: bool = True
    # Longer runs are split into reads of at most this many bytes (at least one group), so
    # that large selections still keep several requests in flight.
    max_read_bytes: int = 512 << 10
    # Unrequested bytes worth reading between two requested runs to make them one read: a
    # device whose request latency costs more than reading that gap does one request instead
    # of two (0 = only adjacent groups are joined).
    read_gap_bytes: int = 0
    # 32-byte AES-256-GCM key for encryption at rest; None = plaintext.
    encryption_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())
        for name in ("num_layers", "num_kv_heads", "head_dim", "group_size", "io_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreError(f"StoreConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.kernel_aio, bool):
            raise StoreError(f"StoreConfig.kernel_aio must be a bool, got {self.kernel_aio!r}")
        if not isinstance(self.max_read_bytes, int) or self.max_read_bytes < 4096:
            raise StoreError(f"StoreConfig.max_read_bytes must be an int >= 4096, got {self.max_read_bytes!r}")
        if not isinstance(self.read_gap_bytes, int) or isinstance(self.read_gap_bytes, bool) or self.read_gap_bytes < 0:
            raise StoreError(f"StoreConfig.read_gap_bytes must be an int >= 0, got {self.read_gap_bytes!r}")
        if self.dtype not in DTYPES:
            raise StoreError(f"StoreConfig.dtype {self.dtype!r} unsupported; supported: {', '.join(DTYPES)}")
        if not _NAME.match(self.tenant):
            raise StoreError(f"StoreConfig.tenant {self.tenant!r} must match {_NAME.pattern}")
        if not re.fullmatch(r"[0-9a-f]{16,64}", self.model_fingerprint):
            raise StoreError("StoreConfig.model_fingerprint must be 16-64 lowercase hex digits")
        if self.capacity_bytes is not None and self.capacity_bytes < self.group_bytes:
            raise StoreError(f"StoreConfig.capacity_bytes must hold at least one group ({self.group_bytes} B)")
        if self.direct_io not in ("auto", "on", "off"):
            raise StoreError(f"StoreConfig.direct_io must be 'auto', 'on' or 'off', got {self.direct_io!r}")
        if self.encryption_key is not None and len(self.encryption_key) != 32:
            raise StoreError("StoreConfig.encryption_key must be 32 bytes (AES-256-GCM)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def group_shape(self) -> tuple[int, int, int, int]:
        """Shape of one group: (num_kv_heads, 2 [K, V], group_size, head_dim)."""
        return (self.num_kv_heads, 2, self.group_size, self.head_dim)

    @property
    def group_bytes(self) -> int:
        n = self.num_kv_heads * 2 * self.group_size * self.head_dim
        return n * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def namespace(self) -> Path:
        """Folder of this model and tenant: <root>/kvswap-v<format>/<fingerprint>/<tenant>."""
        from kvswap_vllm.store.format import FORMAT_VERSION

        return self.root / f"kvswap-v{FORMAT_VERSION}" / self.model_fingerprint[:32] / self.tenant
