"""The disk tier: versioned Arrow IPC block files holding the full KV cache, group by group.

Import rule: nothing here imports vllm, kvswap_vllm.vllm, the predictors or the CLI.
"""

from kvswap_vllm.store.config import StoreConfig
from kvswap_vllm.store.disk_store import DiskStore, ReadRequest, ReadResult, stored_block_hashes
from kvswap_vllm.store.errors import FormatError, ModelMismatchError, StoreError

__all__ = ["DiskStore", "ReadRequest", "stored_block_hashes", "FormatError", "ModelMismatchError", "ReadResult", "StoreConfig", "StoreError"]
