"""Checks a GGUF file before conversion: magic, readable metadata, supported architecture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvswap_vllm.errors import ModelPrepareError

GGUF_MAGIC = b"GGUF"
#: Architectures whose GGUF transformers can dequantise and vLLM can serve as Llama-like.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class GGUFInfo:
    """What kvswap needs to know about a GGUF file before converting it."""

    path: Path
    # `general.architecture`, e.g. "llama".
    architecture: str
    # `general.name` when present, else the file stem.
    name: str
    # Number of tensors in the file; a cheap sanity check on truncation.
    num_tensors: int
    # Sum of all tensor element counts (weights), used to size the conversion on disk.
    num_params: int


def _field_str(reader: object, key: str) -> str | None:
    field = reader.fields.get(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read and validate the header of a GGUF file; raise ModelPrepareError naming the problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelPrepareError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ModelPrepareError(f"not a file: {path} (pass the path of a .gguf file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelPrepareError(f"not a GGUF file: {path} (first bytes {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises assorted errors on truncated files
        raise ModelPrepareError(f"corrupt or truncated GGUF file: {path} ({type(exc).__name__}: {exc})") from exc
    arch = _field_str(reader, "general.architecture")
    if arch is None:
        raise ModelPrepareError(f"GGUF file {path} has no general.architecture field")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelPrepareError(
            f"unsupported architecture {arch!r} in {path.name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    num_params = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=_field_str(reader, "general.name") or path.stem,
        num_tensors=len(reader.tensors),
        num_params=num_params,
    )
