"""vLLM's paged KV buffer as a lazily mapped sparse file: a logical block pool that costs no
memory for blocks nobody writes.

vLLM allocates its KV backing buffer with `torch.zeros`, which commits every page. With KVSwap
decoding the attention backend keeps the KV itself and never writes that buffer, so the
connector hands vLLM (through `get_mem_pool_context`) an allocation context in which that one
call returns a shared mapping of a sparse, already unlinked file instead: untouched pages are
neither resident nor on disk.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# Only the KV backing buffer is this large an int8 allocation during KV set-up.
MIN_LAZY_BYTES = 64 << 20


def lazy_zeros(nbytes: int, folder: Path) -> torch.Tensor:
    """An int8 tensor of `nbytes` zeros backed by a sparse file mapping (nothing committed)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".kvswap-pool-", dir=folder)
    try:
        os.ftruncate(fd, nbytes)
        return torch.from_file(name, shared=True, size=nbytes, dtype=torch.int8)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the file alive; nothing is left behind on exit


class _TorchWithLazyZeros:
    """Stands in for `torch` in vLLM's allocation module during KV set-up."""

    def __init__(self, real: Any, folder: Path) -> None:
        self._real, self._folder = real, folder

    def zeros(self, *size: Any, dtype: Any = None, device: Any = None, **kwargs: Any) -> torch.Tensor:
        n = size[0] if len(size) == 1 and isinstance(size[0], int) else None
        on_cpu = device is None or torch.device(device).type == "cpu"
        if n is not None and n >= MIN_LAZY_BYTES and dtype is torch.int8 and on_cpu and not kwargs:
            return lazy_zeros(n, self._folder)
        return self._real.zeros(*size, dtype=dtype, device=device, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextmanager
def lazy_kv_buffer(folder: Path) -> Iterator[None]:
    from vllm.v1.worker import utils

    real = utils.torch
    utils.torch = _TorchWithLazyZeros(real, folder)
    try:
        yield
    finally:
        utils.torch = real
