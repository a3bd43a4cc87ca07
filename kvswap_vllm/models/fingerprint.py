"""A model's identity: what the disk tier and the low-rank adapters are bound to."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.paths import kvswap_home

_CACHE_FILE = "fingerprints.json"


def _weights(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise KVSwapError(f"{folder} holds no *.safetensors or *.bin weights")
    return files


def model_fingerprint(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over the canonical config.json and every weight file's bytes, as 64 hex digits.

    Weight hashes are cached by (path, size, mtime), so only the first call reads the weights.
    """
    folder = Path(folder).expanduser().resolve()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise KVSwapError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in _weights(folder):
        h.update(path.name.encode())
        h.update(_file_sha256(path).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    cache_path = kvswap_home() / _CACHE_FILE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    cache[key] = h.hexdigest()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return cache[key]
