"""`kvswap store inspect DIR`: what block files a folder holds, and whether their bytes are intact."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from kvswap_vllm.store.errors import FormatError
from kvswap_vllm.store.fileio import drop_page_cache
from kvswap_vllm.store.format import SegmentInfo, checksum, open_segment


@dataclass(frozen=True)
class FileReport:
    """One block file as `inspect` sees it."""

    path: str
    # "ok", "N/M groups fail their checksum", or why the file cannot be used.
    status: str
    format_version: str | None = None
    model_fingerprint: str | None = None
    tenant: str | None = None
    sequence: str | None = None
    layer: int | None = None
    groups: int = 0
    bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _raw_metadata(path: Path) -> dict[str, str]:
    try:
        with pa.memory_map(str(path)) as mm:
            meta = pa.ipc.open_file(mm).schema.metadata or {}
    except (pa.ArrowInvalid, OSError):
        return {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def _bad_rows(info: SegmentInfo) -> int:
    """Groups whose stored CRC-32C does not match their bytes (file read once, then uncached)."""
    with open(info.path, "rb") as f:
        f.seek(info.data_offset)
        data = memoryview(f.read(info.num_groups * info.row_bytes))
        drop_page_cache(f.fileno())
    rb = info.row_bytes
    return sum(checksum(data[i * rb:(i + 1) * rb]) != int(info.crc32c[i]) for i in range(info.num_groups))


def inspect_file(path: Path, root: Path, verify: bool = True) -> FileReport:
    rel = path.relative_to(root)
    tenant = rel.parts[-3] if len(rel.parts) >= 3 else None
    size = path.stat().st_size
    meta = _raw_metadata(path)
    common = dict(path=str(rel), format_version=meta.get("kvswap.format_version"),
                  model_fingerprint=meta.get("kvswap.model_fingerprint"), tenant=tenant,
                  sequence=meta.get("kvswap.sequence"), bytes=size)
    try:
        info = open_segment(path, None)
    except FormatError as exc:
        return FileReport(status=str(exc).replace(f"{path}: ", ""), **common)
    bad = _bad_rows(info) if verify else 0
    status = "ok" if bad == 0 else f"{bad}/{info.num_groups} groups fail their checksum"
    if not verify:
        status = "not verified"
    return FileReport(status=status, layer=info.layer, groups=info.num_groups, **common)


def inspect_dir(root: Path, verify: bool = True) -> list[FileReport]:
    """Reports for every block file below `root`, sorted by path; temp files are skipped."""
    paths = sorted(p for p in root.rglob("*.arrow") if p.is_file() and not p.name.startswith(".tmp-"))
    return [inspect_file(p, root, verify) for p in paths]


def summarize(reports: list[FileReport]) -> str:
    models = {r.model_fingerprint for r in reports if r.model_fingerprint}
    bad = sum(r.status not in ("ok", "not verified") for r in reports)
    total = sum(r.bytes for r in reports)
    return (f"{len(reports)} block files, {total / 2**20:.1f} MiB, {len(models)} model(s), "
            f"{bad} with problems")


def format_table(reports: list[FileReport]) -> str:
    lines = [f"{'path':<60} {'ver':>3} {'model':<16} {'layer':>5} {'groups':>7} {'bytes':>11}  status"]
    for r in reports:
        lines.append(f"{r.path:<60} {r.format_version or '-':>3} {(r.model_fingerprint or '-')[:16]:<16} "
                     f"{'-' if r.layer is None else r.layer:>5} {r.groups:>7} {r.bytes:>11}  {r.status}")
    return os.linesep.join(lines)
