"""The block-file format (spec: docs/format.md): one Arrow IPC file = a run of groups of one
layer of one sequence. Thin code over pyarrow; every check raises a precise FormatError."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import pyarrow as pa

from kvswap_vllm.store.config import StoreConfig
from kvswap_vllm.store.errors import DamagedFileError, FormatError, ModelMismatchError
from kvswap_vllm.store.fileio import aligned_buffer

FORMAT_VERSION = 1
#: The kv bytes of a block file start at a multiple of this (O_DIRECT alignment).
DATA_ALIGN = 4096
#: Byte order of one group: KV heads, then K before V, then tokens, then head_dim.
LAYOUT = "H,KV,G,D"
ENCRYPTION_NONE = "none"
ENCRYPTION_AES_GCM = "aes-256-gcm"
_P = "kvswap."


def checksum(data: memoryview | bytes, release_gil: bool = False) -> int:
    """CRC-32C (Castagnoli) of one group's stored bytes; hardware-accelerated where the CPU has it.

    release_gil: release the GIL even for a small group. The write path wants it: its writer
    thread, back from a syscall, then resumes at once instead of waiting out the interpreter's
    switch interval (5 ms) behind the caller's checksum loop. Reads do not (measured: with eight
    reader threads the extra GIL hand-offs cost more than they free)."""
    return crc32c.crc32c(data, gil_release_mode=1 if release_gil else -1)


def schema(row_bytes: int, meta: dict[str, str]) -> pa.Schema:
    """Columns: kv (one group's bytes), group_id, crc32c of kv, block_hash (nullable)."""
    return pa.schema(
        [
            # kv first: its bytes then start at an offset that does not depend on the row count.
            pa.field("kv", pa.binary(row_bytes), nullable=False),
            pa.field("group_id", pa.int64(), nullable=False),
            pa.field("crc32c", pa.uint32(), nullable=False),
            pa.field("block_hash", pa.binary(), nullable=True),
        ],
        metadata={f"{_P}{k}": v for k, v in meta.items()},
    )


#: Prefix of the caller's own entries in a file's schema metadata (`kvswap.aux.<key>`).
AUX = "aux."


def file_metadata(cfg: StoreConfig, layer: int, sequence: str, first_group: int,
                  aux: dict[str, str] | None = None) -> dict[str, str]:
    """Schema metadata pinning everything a reader must agree on, plus the caller's `aux`
    entries (e.g. the predictor's metadata of the file's groups)."""
    return {**{AUX + k: v for k, v in (aux or {}).items()},
        "format_version": str(FORMAT_VERSION),
        "model_fingerprint": cfg.model_fingerprint,
        "dtype": cfg.dtype,
        "layer": str(layer),
        "group_size": str(cfg.group_size),
        "num_kv_heads": str(cfg.num_kv_heads),
        "head_dim": str(cfg.head_dim),
        "layout": LAYOUT,
        "sequence": sequence,
        "first_group": str(first_group),
        "encryption": ENCRYPTION_AES_GCM if cfg.encryption_key else ENCRYPTION_NONE,
    }


def read_aux(path: Path) -> dict[str, str]:
    """The `aux` entries a block file was written with (its footer only is read)."""
    try:
        with pa.memory_map(str(path)) as mm:
            meta = read_metadata(pa.ipc.open_file(mm).schema, path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DamagedFileError(f"{path}: cannot read the block file's metadata ({exc})") from exc
    return {k[len(AUX):]: v for k, v in meta.items() if k.startswith(AUX)}


def read_metadata(sch: pa.Schema, path: Path) -> dict[str, str]:
    raw = sch.metadata or {}
    meta = {k.decode()[len(_P):]: v.decode() for k, v in raw.items() if k.startswith(_P.encode())}
    if "format_version" not in meta:
        raise FormatError(f"{path}: an Arrow file, but not a kvswap block file (no kvswap.format_version)")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise FormatError(
            f"{path}: block-file format version {meta['format_version']}, this kvswap reads {FORMAT_VERSION}; "
            "upgrade kvswap or delete the cache folder"
        )
    return meta


def check_compatible(meta: dict[str, str], cfg: StoreConfig, path: Path) -> None:
    """Refuse a file written for another model, dtype or layout."""
    expected = file_metadata(cfg, layer=0, sequence="", first_group=0)
    for key in ("model_fingerprint", "dtype", "group_size", "num_kv_heads", "head_dim", "layout", "encryption"):
        if meta.get(key) != expected[key]:
            raise ModelMismatchError(
                f"{path}: written with {key}={meta.get(key)!r}, this store has {key}={expected[key]!r} "
                "(a cache of another model or configuration)"
            )


@dataclass(frozen=True)
class SegmentInfo:
    """Where the bytes of a block file's groups are, read once from its Arrow footer."""

    path: Path
    layer: int
    sequence: str
    first_group: int
    num_groups: int
    # Bytes per row of the kv column (a group, plus nonce and tag when encrypted).
    row_bytes: int
    # File offset of row 0 of the kv column; rows are contiguous (fixed-size binary).
    data_offset: int
    # CRC-32C of each row of the kv column.
    crc32c: np.ndarray
    # row -> block_hash, for the rows that end a vLLM block.
    block_hashes: dict[int, bytes]
    file_bytes: int

    @property
    def last_group(self) -> int:
        return self.first_group + self.num_groups - 1


def open_segment(path: Path, cfg: StoreConfig | None) -> SegmentInfo:
    """Parse a block file's footer and metadata (not its data); check it against `cfg`."""
    try:
        with pa.memory_map(str(path)) as mm:
            return parse_segment(mm, path, cfg)
    except OSError as exc:
        raise DamagedFileError(f"{path}: cannot open block file ({exc})") from exc


def parse_segment(source: pa.NativeFile | pa.Buffer, path: Path, cfg: StoreConfig | None) -> SegmentInfo:
    """SegmentInfo of a block file held in a memory map or an in-memory buffer."""
    if isinstance(source, pa.Buffer):
        base, size, source = source.address, source.size, pa.BufferReader(source)
    else:
        base, size = _base_address(source), source.size()
    try:
        reader = pa.ipc.open_file(source)
        meta = read_metadata(reader.schema, path)
        if cfg is not None:
            check_compatible(meta, cfg, path)
        if reader.num_record_batches != 1:
            raise DamagedFileError(f"{path}: {reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        kv = batch.column("kv")  # column 0
        info = SegmentInfo(
            path=path,
            layer=int(meta["layer"]),
            sequence=meta["sequence"],
            first_group=int(meta["first_group"]),
            num_groups=batch.num_rows,
            row_bytes=kv.type.byte_width,
            data_offset=kv.buffers()[1].address - base + kv.offset * kv.type.byte_width,
            crc32c=batch.column("crc32c").to_numpy().copy(),
            block_hashes=_non_null(batch.column("block_hash")),
            file_bytes=size,
        )
        ids = batch.column("group_id").to_numpy()
    except (pa.ArrowInvalid, pa.ArrowIOError, KeyError, ValueError) as exc:
        raise DamagedFileError(f"{path}: damaged or truncated block file ({exc})") from exc
    if not np.array_equal(ids, np.arange(info.first_group, info.first_group + info.num_groups)):
        raise DamagedFileError(f"{path}: group ids are not the contiguous run its metadata promises")
    if info.data_offset + info.num_groups * info.row_bytes > info.file_bytes:
        raise DamagedFileError(f"{path}: kv column extends past the end of the file")
    return info


def _non_null(col: pa.Array) -> dict[int, bytes]:
    if col.null_count == len(col):
        return {}
    rows = np.flatnonzero(col.is_valid().to_numpy(zero_copy_only=False))
    return {int(r): col[int(r)].as_py() for r in rows}


def _base_address(mm: pa.NativeFile) -> int:
    mm.seek(0)
    return mm.read_buffer(1).address


@dataclass(frozen=True)
class SerializedSegment:
    """A block file as pieces to write: (file offset, bytes). The kv column is a view of the
    caller's memory (zero-copy); the header and trailer are small staged copies."""

    pieces: tuple[tuple[int, memoryview], ...]
    size: int
    data_offset: int


class _PieceSink:
    """A write-only stream for the IPC writer that keeps the kv buffer by reference."""

    def __init__(self, kv_address: int) -> None:
        self.kv_address = kv_address
        self.pos = 0
        self.pieces: list[tuple[int, memoryview]] = []
        self._staged = bytearray()
        self._staged_at = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) and pa.py_buffer(data).address == self.kv_address:
            self._cut()
            self.pieces.append((self.pos, view))
            self._staged_at = self.pos + len(view)
        else:
            self._staged += view
        self.pos += len(view)
        return len(view)

    def _cut(self) -> None:
        if self._staged:
            self.pieces.append((self._staged_at, _aligned_copy(self._staged)))
            self._staged = bytearray()

    def finish(self) -> list[tuple[int, memoryview]]:
        self._cut()
        return self.pieces

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def tell(self) -> int:
        return self.pos

    def writable(self) -> bool:
        return True


def _aligned_copy(data: bytes | bytearray) -> memoryview:
    buf = aligned_buffer(len(data))
    buf[: len(data)] = data
    return memoryview(buf)[: len(data)]


def serialize_segment(
    cfg: StoreConfig, layer: int, sequence: str, first_group: int,
    rows: memoryview, row_bytes: int, crcs: np.ndarray, block_hashes: list[bytes | None],
    aux: dict[str, str] | None = None,
) -> SerializedSegment:
    """One block file (a single record batch of `len(crcs)` groups) as pieces to write. The kv
    bytes are not copied: when `rows` is page-aligned memory they go to disk with O_DIRECT."""
    sch = _aligned_schema(row_bytes, file_metadata(cfg, layer, sequence, first_group, aux))
    batch = _batch(sch, row_bytes, rows, first_group, crcs, block_hashes)
    sink = _PieceSink(pa.py_buffer(rows).address)
    _write_ipc(pa.PythonFile(sink, mode="w"), sch, batch)
    pieces = sink.finish()
    kv_offset = next((off for off, view in pieces if len(view) == len(rows) and off % 8 == 0
                      and pa.py_buffer(view).address == sink.kv_address), None)
    if kv_offset is None:
        raise AssertionError("pyarrow did not hand the kv buffer over by reference")
    return SerializedSegment(tuple(pieces), sink.pos, kv_offset)


def segment_info(path: Path, layer: int, sequence: str, first_group: int, row_bytes: int, crcs: np.ndarray,
                 block_hashes: list[bytes | None], written: SerializedSegment) -> SegmentInfo:
    """The SegmentInfo of a file this process just wrote (no need to parse it back)."""
    return SegmentInfo(path=path, layer=layer, sequence=sequence, first_group=first_group, num_groups=len(crcs),
                       row_bytes=row_bytes, data_offset=written.data_offset, crc32c=crcs.copy(),
                       block_hashes={i: h for i, h in enumerate(block_hashes) if h is not None},
                       file_bytes=written.size)


def _batch(sch: pa.Schema, row_bytes: int, rows: memoryview | bytes, first_group: int, crcs: np.ndarray,
           block_hashes: list[bytes | None]) -> pa.RecordBatch:
    n = len(crcs)
    kv = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, pa.py_buffer(rows)])
    return pa.record_batch(
        [kv, pa.array(np.arange(first_group, first_group + n, dtype=np.int64)),
         pa.array(crcs, type=pa.uint32()), _hash_column(block_hashes)],
        schema=sch,
    )


def _hash_column(block_hashes: list[bytes | None]) -> pa.Array:
    if not any(block_hashes):  # the common case (decode groups, private requests): no list walk in Arrow
        return pa.nulls(len(block_hashes), pa.binary())
    return pa.array(block_hashes, type=pa.binary())


def _kv_offset(sch: pa.Schema, row_bytes: int) -> int:
    """File offset of the kv values for this schema (the same for any row count)."""
    sink = pa.BufferOutputStream()
    _write_ipc(sink, sch, _batch(sch, row_bytes, bytes(row_bytes), 0, np.zeros(1, np.uint32), [None]))
    buf = sink.getvalue()
    with pa.ipc.open_file(pa.BufferReader(buf)) as reader:
        return reader.get_batch(0).column(0).buffers()[1].address - buf.address


def _aligned_schema(row_bytes: int, meta: dict[str, str]) -> pa.Schema:
    """The schema, padded through a metadata entry so that the kv bytes start on a 4 KiB
    boundary: O_DIRECT can then read groups straight into the caller's aligned tensor."""
    pad = 0
    for _ in range(16):
        sch = schema(row_bytes, {**meta, "pad": " " * pad})
        miss = _kv_offset(sch, row_bytes) % DATA_ALIGN
        if miss == 0:
            return sch
        pad = (pad + DATA_ALIGN - miss) % DATA_ALIGN
    return schema(row_bytes, meta)  # unaligned is still correct, only not zero-copy


def _write_ipc(sink: pa.NativeFile, sch: pa.Schema, batch: pa.RecordBatch) -> None:
    with pa.ipc.new_file(sink, sch) as writer:
        writer.write_batch(batch)
