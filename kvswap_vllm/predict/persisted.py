"""Predictor metadata rows as entries of a block file's metadata (`kvswap.aux.meta.*`).

The low-rank keys travel in the same file as the groups they summarise, so they are written,
evicted and deleted together, and a restarted engine can decode sparsely over a stored prefix
without recomputing it. Rows are only taken back by a predictor with the same `metadata_id`
(predictor name and adapter bases) and when their checksum matches.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.store.format import checksum


class MetadataError(KVSwapError):
    """Stored metadata rows are missing, of another predictor or adapter, or damaged."""


def rows_to_aux(rows: torch.Tensor, metadata_id: str) -> dict[str, str]:
    data = rows.contiguous().numpy().tobytes()
    return {"meta.id": metadata_id, "meta.dtype": str(rows.dtype).removeprefix("torch."),
            "meta.shape": ",".join(str(d) for d in rows.shape), "meta.crc32c": str(checksum(data)),
            "meta.data": base64.b64encode(data).decode("ascii")}


def rows_from_aux(aux: dict[str, str], metadata_id: str, where: str) -> torch.Tensor:
    """The rows stored in `aux` (a file's entries); `where` names the file in errors."""
    if "meta.id" not in aux:
        raise MetadataError(f"{where}: no predictor metadata stored")
    if aux["meta.id"] != metadata_id:
        raise MetadataError(f"{where}: metadata of {aux['meta.id']!r}, this predictor is {metadata_id!r}")
    try:
        data = base64.b64decode(aux["meta.data"], validate=True)
        shape = tuple(int(d) for d in aux["meta.shape"].split(","))
        if checksum(data) != int(aux["meta.crc32c"]):
            raise MetadataError(f"{where}: predictor metadata fails its checksum")
        rows = np.frombuffer(data, dtype=np.dtype(aux["meta.dtype"])).reshape(shape)
    except (KeyError, ValueError, TypeError) as exc:
        raise MetadataError(f"{where}: damaged predictor metadata ({exc})") from exc
    return torch.from_numpy(rows.copy())
