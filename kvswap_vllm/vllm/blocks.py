"""vLLM blocks as disk-tier groups: deterministic content hashes and per-backend KV layouts.

One vLLM block of one layer is stored as one group of the disk tier, with group_size equal to
vLLM's block size, in the store's group shape (num_kv_heads, 2 [K, V], block_size, head_dim).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvswap_vllm.errors import KVSwapError

HASH_BYTES = 32


def namespace_seed(model_fingerprint: str, block_size: int, lora_name: str | None = None,
                   cache_salt: str | None = None) -> bytes:
    """The hash of the empty prefix. vLLM's own block hashes start from a random seed unless
    PYTHONHASHSEED is set, so they do not survive a restart; these do. The LoRA adapter and
    the cache salt change the KV of the same tokens, so they start a different chain."""
    h = hashlib.sha256(b"kvswap-block-hash-v1\0")
    for part in (model_fingerprint, str(block_size), lora_name or "", cache_salt or ""):
        h.update(part.encode())
        h.update(b"\0")
    return h.digest()


def chain_hashes(seed: bytes, token_ids: Sequence[int], block_size: int, start_block: int = 0,
                 parent: bytes | None = None, num_blocks: int | None = None) -> list[bytes]:
    """Hashes of full blocks start_block, start_block+1, ... of `token_ids`; each covers its
    parent's hash and its own tokens, so equal hashes mean equal prefixes. `parent` is the hash
    of block start_block-1 (the seed when start_block == 0)."""
    if start_block > 0 and parent is None:
        raise ValueError("parent hash required when start_block > 0")
    end = len(token_ids) // block_size if num_blocks is None else start_block + num_blocks
    if end * block_size > len(token_ids):
        raise ValueError(f"{end} blocks need {end * block_size} tokens, got {len(token_ids)}")
    tokens = np.asarray(token_ids[start_block * block_size:end * block_size], dtype="<i8")
    prev = seed if start_block == 0 else parent
    out: list[bytes] = []
    for i in range(end - start_block):
        prev = hashlib.sha256(prev + tokens[i * block_size:(i + 1) * block_size].tobytes()).digest()
        out.append(prev)
    return out


@dataclass(frozen=True)
class KVLayout:
    """How one layer's paged KV tensor is laid out, so blocks can be copied out and back in."""

    # "cpu": (num_blocks, H, N, 2*D), per (block, head) K then V (vLLM's CPU_ATTN);
    # "nhd": (2, num_blocks, N, H, D) and "hnd": (2, num_blocks, H, N, D) (CUDA backends).
    kind: str
    num_kv_heads: int
    head_dim: int
    block_size: int

    @classmethod
    def detect(cls, kv: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int,
               cuda_layout: str = "NHD") -> "KVLayout":
        shape = tuple(kv.shape)
        if kv.dim() == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_dim):
            return cls("cpu", num_kv_heads, head_dim, block_size)
        nhd = (2, shape[1] if kv.dim() == 5 else -1, block_size, num_kv_heads, head_dim)
        hnd = (2, nhd[1], num_kv_heads, block_size, head_dim)
        candidates = [k for k, s in (("nhd", nhd), ("hnd", hnd)) if shape == s]
        if len(candidates) == 2:  # block_size == num_kv_heads: the backend's declared layout decides
            candidates = [cuda_layout.lower()]
        if not candidates:
            raise KVSwapError(
                f"kvswap connector: unsupported KV cache tensor of shape {shape} (block size "
                f"{block_size}, {num_kv_heads} KV heads, head dim {head_dim}); supported layouts: "
                "CPU_ATTN (blocks, heads, block_size, 2*head_dim) and (2, blocks, block_size|heads, "
                "heads|block_size, head_dim)")
        return cls(candidates[0], num_kv_heads, head_dim, block_size)

    def gather(self, kv: torch.Tensor, block_ids: Sequence[int]) -> torch.Tensor:
        """Copies of the blocks, on the CPU, shaped (n, H, 2, N, D) and contiguous."""
        idx = torch.as_tensor(block_ids, dtype=torch.long, device=kv.device)
        if self.kind == "cpu":  # (n, H, N, 2D) is already (n, H, 2, N, D) in memory
            out = kv.index_select(0, idx)
        elif self.kind == "nhd":  # (2, n, N, H, D) -> (n, H, 2, N, D)
            out = kv.index_select(1, idx).permute(1, 3, 0, 2, 4)
        else:  # (2, n, H, N, D) -> (n, H, 2, N, D)
            out = kv.index_select(1, idx).permute(1, 2, 0, 3, 4)
        out = out.to("cpu").contiguous()
        return out.view(len(block_ids), self.num_kv_heads, 2, self.block_size, self.head_dim)

    def scatter(self, kv: torch.Tensor, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write blocks shaped (n, H, 2, N, D) into the paged tensor at `block_ids`."""
        idx = torch.as_tensor(block_ids, dtype=torch.long, device=kv.device)
        data = data.to(kv.device, kv.dtype)
        if self.kind == "cpu":
            kv.index_copy_(0, idx, data.reshape(len(block_ids), *kv.shape[1:]))
        elif self.kind == "nhd":
            kv.index_copy_(1, idx, data.permute(2, 0, 3, 1, 4))
        else:
            kv.index_copy_(1, idx, data.permute(2, 0, 1, 3, 4))
