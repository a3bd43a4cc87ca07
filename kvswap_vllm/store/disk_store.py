"""DiskStore: the full KV cache on disk, as runs of groups per (sequence, layer).

Reads take any set of groups, coalesce adjacent ones into extents, and issue the extents with
O_DIRECT into aligned buffers, all at once through kernel AIO where the kernel offers it, else
from a thread pool; every group's checksum is verified, and a
mismatch is reported as a miss (the caller recomputes), never served. Writes are whole block
files made visible by an atomic rename. A byte capacity is enforced with LRU eviction of files
no open sequence uses; a full disk stops writing (one warning) and reads go on.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from kvswap_vllm.resources import helper_thread_pool
from kvswap_vllm.store import aio, fileio
from kvswap_vllm.store.config import StoreConfig
from kvswap_vllm.store.crypto import OVERHEAD, GroupCipher
from kvswap_vllm.store.errors import DamagedFileError, FormatError, MissingGroupsError, StoreError
from kvswap_vllm.store.format import (
    SegmentInfo, SerializedSegment, checksum, open_segment, read_aux, segment_info, serialize_segment,
)
from kvswap_vllm.store.throttle import Throttle

log = logging.getLogger(__name__)
SEGMENT_SUFFIX = ".arrow"
# Refresh a file's mtime (the persisted LRU clock) at most this often per file.
_TOUCH_INTERVAL_S = 30.0


@dataclass
class StoreStats:
    """Counters since the store was opened."""

    bytes_read: int = 0
    bytes_written: int = 0
    groups_read: int = 0
    groups_written: int = 0
    extents_read: int = 0
    read_requests: int = 0
    # Groups asked for that are not on disk (never written, evicted, or unreadable).
    groups_missing: int = 0
    checksum_failures: int = 0
    # Damaged files found at start-up (removed) and files of another version/model (left alone).
    corrupt_files: int = 0
    foreign_files: int = 0
    evicted_files: int = 0
    evicted_bytes: int = 0
    capacity_rejects: int = 0
    disk_full_events: int = 0
    read_wait_s: float = 0.0
    # Seconds with at least one read in flight (concurrent reads counted once): what reading
    # alone would take if nothing else ran (benchmarks report it as I/O-only time).
    read_busy_s: float = 0.0
    # True when reads bypass the page cache with O_DIRECT; False means buffered + DONTNEED.
    direct_io: bool = False
    # True when a call's reads go to the kernel together (kernel AIO), False: thread lanes.
    kernel_aio: bool = False

    def as_dict(self) -> dict[str, float | int | bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ReadResult:
    """Groups read for one (sequence, layer) request."""

    # (len(group_ids), num_kv_heads, 2, group_size, head_dim); rows of groups not found are undefined.
    kv: torch.Tensor
    # Per requested group: True if its bytes were read and verified.
    found: np.ndarray
    bytes_read: int = 0
    extents: int = 0

    @property
    def missing(self) -> list[int]:
        return [i for i, ok in enumerate(self.found) if not ok]

    @classmethod
    def joined(cls, parts: list["ReadResult"], kv: torch.Tensor) -> "ReadResult":
        """One result for requests whose outs are consecutive slices of `kv`, in order."""
        if len(parts) == 1:
            return parts[0]
        found = np.concatenate([p.found for p in parts]) if parts else np.zeros(0, dtype=bool)
        return cls(kv, found, sum(p.bytes_read for p in parts), sum(p.extents for p in parts))


class _Target:
    """One request of a read call: its (sequence, layer, ids), where its rows go (`rows`
    (len(ids), row bytes) uint8 over the caller's tensor, the same bytes as a flat memoryview,
    their address), `found` per id, and its extents."""

    __slots__ = ("sequence", "layer", "ids", "out", "rows", "bytes", "address", "found", "extents", "nbytes")

    def __init__(self, sequence: str, layer: int, ids: list[int], out: torch.Tensor) -> None:
        self.sequence, self.layer, self.ids, self.out = sequence, layer, ids, out
        self.found = np.zeros(len(ids), dtype=bool)
        self.rows = out.view(len(ids), -1).view(torch.uint8)
        self.bytes = memoryview(self.rows.numpy()).cast("B")
        self.address = self.rows.data_ptr()
        self.extents: list[_Extent] = []
        self.nbytes = 0

    def result(self) -> "ReadResult":
        return ReadResult(kv=self.out, found=self.found, bytes_read=self.nbytes, extents=len(self.extents))


@dataclass(frozen=True)
class ReadRequest:
    """Groups `ids` of one layer of one sequence, into `out` (see DiskStore.read_groups)."""

    sequence: str
    layer: int
    ids: list[int]
    out: torch.Tensor | None = None


@dataclass
class _Segment:
    info: SegmentInfo
    last_used: float
    file: fileio.ReadFile | None = None
    pins: int = 0


@dataclass
class _Extent:
    seg: _Segment
    first_row: int
    count: int
    # Positions in the caller's request that these rows fill.
    out_pos: list[int] = field(default_factory=list)
    # When row i of the extent fills position out_start + i for every i (no duplicates, in
    # order): that position; else -1.
    out_start: int = -1


class DiskStore:
    """The disk tier of one model and tenant (see StoreConfig)."""

    def __init__(self, config: StoreConfig, throttle: Throttle | None = None) -> None:
        self.config = config
        self.stats = StoreStats()
        self._lock = threading.RLock()
        self._throttle = throttle
        self._cipher = GroupCipher(config.encryption_key) if config.encryption_key else None
        self._row_bytes = config.group_bytes + (OVERHEAD if self._cipher else 0)
        self._segments: dict[tuple[str, int], list[_Segment]] = {}
        self._by_hash: dict[bytes, tuple[str, int]] = {}
        self._private: set[str] = set()
        self._open_seqs: dict[str, int] = {}
        self._used_bytes = 0
        self._writes_disabled = False
        fileio.ensure_private_dir(config.namespace, config.root)
        self._direct = self._choose_direct_io()
        self.stats.direct_io = self._direct
        # Kernel AIO where no read blocks in io_submit: O_DIRECT, or files in memory (tmpfs:
        # buffered reads are copies; benchmarks keep a disk tier there for compute-only time, which
        # then takes the same read path); and without a throttle (which paces reads one request at
        # a time, as the emulated device would). Buffered AIO reads from a device block.
        self._aio = config.kernel_aio and throttle is None and aio.available() and \
            (self._direct or fileio.in_memory_fs(config.namespace))
        self.stats.kernel_aio = self._aio
        self._aio_local = threading.local()  # one AIO context per reading thread
        self._aio_contexts: list[aio.AsyncReads] = []
        self._scratch: list[mmap.mmap] = []  # AIO read buffers not in use
        self._pool = helper_thread_pool(config.io_threads, "kvswap-io")
        # One writer thread keeps files in submission order; two buffers let the next file be
        # serialised while the previous one is written.
        self._writer = helper_thread_pool(1, "kvswap-writer")
        self._in_flight = threading.BoundedSemaphore(2)
        self._pending: list[tuple[str, int, int, int]] = []
        self._reads_in_flight, self._busy_since = 0, 0.0
        self._load_index()

    # ----- set-up -------------------------------------------------------------------------
    def _choose_direct_io(self) -> bool:
        if self.config.direct_io == "off":
            return False
        ok = fileio.direct_io_supported(self.config.namespace)
        if not ok and self.config.direct_io == "on":
            raise StoreError(f"direct_io='on' but {self.config.namespace} does not support O_DIRECT")
        if not ok:
            log.warning("kvswap store: O_DIRECT unsupported in %s; using buffered reads + DONTNEED",
                        self.config.namespace)
        return ok

    def _load_index(self) -> None:
        """Rebuild the index from the files on disk (survives restarts); drop damaged files."""
        for path in sorted(self.config.namespace.rglob("*")):
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # a write that never completed
            elif path.suffix == SEGMENT_SUFFIX and path.is_file():
                try:
                    info = open_segment(path, self.config)
                except DamagedFileError as exc:
                    log.warning("kvswap store: removing damaged block file: %s", exc)
                    self.stats.corrupt_files += 1
                    path.unlink(missing_ok=True)
                    continue
                except FormatError as exc:  # another version or model: not ours to delete
                    log.warning("kvswap store: ignoring block file: %s", exc)
                    self.stats.foreign_files += 1
                    continue
                self._add(_Segment(info, last_used=path.stat().st_mtime))

    def _add(self, seg: _Segment) -> None:
        info = seg.info
        self._segments.setdefault((info.sequence, info.layer), []).append(seg)
        self._segments[(info.sequence, info.layer)].sort(key=lambda s: s.info.first_group)
        self._used_bytes += info.file_bytes
        for row, h in info.block_hashes.items():
            self._by_hash[h] = (info.sequence, info.first_group + row)

    # ----- sequences ----------------------------------------------------------------------
    def open_sequence(self, sequence: str, private: bool = True) -> None:
        """Pin a sequence's files against eviction; private files are deleted on release."""
        _check_name(sequence)
        with self._lock:
            self._open_seqs[sequence] = self._open_seqs.get(sequence, 0) + 1
            if private:
                self._private.add(sequence)

    def release_sequence(self, sequence: str) -> None:
        """Unpin; a private sequence's files are deleted now (prompts are private data)."""
        with self._lock:
            left = self._open_seqs.get(sequence, 0) - 1
            if left > 0:
                self._open_seqs[sequence] = left
                return
            self._open_seqs.pop(sequence, None)
            if sequence in self._private:
                self._private.discard(sequence)
                self.delete_sequence(sequence)

    def delete_sequence(self, sequence: str) -> None:
        with self._lock:
            for key in [k for k in self._segments if k[0] == sequence]:
                for seg in self._segments.pop(key):
                    self._drop_file(seg)
        seq_dir = self.config.namespace / sequence
        if seq_dir.is_dir() and not any(seq_dir.iterdir()):
            seq_dir.rmdir()

    def sequences(self) -> list[str]:
        with self._lock:
            return sorted({seq for seq, _ in self._segments})

    def num_groups(self, sequence: str, layer: int) -> int:
        """Groups stored contiguously from group 0 for (sequence, layer)."""
        n = 0
        with self._lock:
            for seg in self._segments.get((sequence, layer), []):
                if seg.info.first_group != n:
                    break
                n = seg.info.last_group + 1
        return n

    def segment_aux(self, sequence: str, layer: int, first_group: int, last_group: int) -> list[tuple[int, int, dict[str, str]]]:
        """(first group, number of groups, aux entries) of each file of (sequence, layer) holding
        groups first_group..last_group, in order; raises MissingGroupsError if any is absent."""
        with self._lock:
            segs = [s.info for s in self._segments.get((sequence, layer), [])
                    if s.info.last_group >= first_group and s.info.first_group <= last_group]
        covered = first_group
        for info in segs:
            if info.first_group > covered:
                break
            covered = info.last_group + 1
        if covered <= last_group:
            raise MissingGroupsError(f"{sequence} layer {layer}: groups {covered}..{last_group} are not stored")
        return [(info.first_group, info.num_groups, read_aux(info.path)) for info in segs]

    def find_block(self, block_hash: bytes) -> tuple[str, int] | None:
        """(sequence, group id) of the group that ends the vLLM block with this content hash."""
        with self._lock:
            return self._by_hash.get(block_hash)

    # ----- writes -------------------------------------------------------------------------
    def write_groups(
        self, sequence: str, layer: int, first_group: int, kv: torch.Tensor,
        block_hashes: Sequence[bytes | None] | None = None,
    ) -> bool:
        """Store groups `first_group ...` of one layer; one file, visible all at once or not at all.

        kv: (num_groups, num_kv_heads, 2, group_size, head_dim) in the store's dtype.
        Returns once the file is durable and readable; False (counted) when the capacity or a
        full disk refuses the write.
        """
        return self.write_groups_async(sequence, layer, first_group, kv, block_hashes).result()

    def write_groups_async(
        self, sequence: str, layer: int, first_group: int, kv: torch.Tensor,
        block_hashes: Sequence[bytes | None] | None = None, aux: dict[str, str] | None = None,
    ) -> Future[bool]:
        """Like write_groups, but only checksums and the file layout are computed now; the disk
        write runs in the writer thread, so a prefill prepares layer L+1 while layer L is
        written. The kv bytes are written from `kv` itself (zero-copy; page-aligned memory such
        as `fileio.aligned_tensor` bypasses the page cache): do not modify `kv` until the future
        resolves. The groups become readable then. `aux`: the caller's entries for the file's
        metadata (not written when the store encrypts: they would be plaintext)."""
        _check_name(sequence)
        n = self._check_kv(kv, layer)
        hashes = list(block_hashes) if block_hashes is not None else [None] * n
        if len(hashes) != n:
            raise ValueError(f"block_hashes has {len(hashes)} entries for {n} groups")
        if self._writes_disabled:
            return _resolved(False)
        with self._lock:
            self._check_no_overlap(sequence, layer, first_group, n)
        rows, crcs = self._encode_rows(sequence, layer, first_group, kv)
        aux = None if self._cipher is not None else aux
        data = serialize_segment(self.config, layer, sequence, first_group, rows, self._row_bytes, crcs, hashes, aux)
        self._in_flight.acquire()  # at most two files queued: back-pressure on a slow disk
        try:
            with self._lock:
                self._check_no_overlap(sequence, layer, first_group, n)
                if not self._make_room(data.size):
                    self.stats.capacity_rejects += 1
                    self._in_flight.release()
                    return _resolved(False)
                self._used_bytes += data.size  # reserved until the file exists
                self._pending.append((sequence, layer, first_group, n))
                path = self._segment_path(sequence, layer, first_group)
                fileio.ensure_private_dir(path.parent, self.config.root)
        except BaseException:
            self._in_flight.release()
            raise
        info = segment_info(path, layer, sequence, first_group, self._row_bytes, crcs, hashes, data)
        # `kv` and `rows` stay referenced by the task until the bytes are on disk.
        return self._writer.submit(self._finish_write, path, data, info, (sequence, layer, first_group, n), (kv, rows))

    def _finish_write(self, path: Path, data: SerializedSegment, info: SegmentInfo,
                      key: tuple[str, int, int, int], keep_alive: object) -> bool:
        try:
            try:
                fileio.write_atomic(path, data.pieces)
            finally:
                self._in_flight.release()
        except OSError as exc:
            with self._lock:
                self._used_bytes -= data.size
                self._pending.remove(key)
            if not fileio.is_disk_full(exc):
                raise StoreError(f"cannot write block file {path}: {exc.strerror or exc}") from exc
            self._on_disk_full(path, exc)
            return False
        with self._lock:
            self._used_bytes -= data.size
            self._pending.remove(key)
            self._add(_Segment(info, last_used=time.time()))
            self.stats.bytes_written += data.size
            self.stats.groups_written += key[3]
        return True

    def flush(self) -> None:
        """Wait until every write submitted so far is durable and readable."""
        self._writer.submit(lambda: None).result()

    def _encode_rows(self, sequence: str, layer: int, first_group: int, kv: torch.Tensor) -> tuple[object, np.ndarray]:
        raw = memoryview(kv.contiguous().view(torch.uint8).numpy()).cast("B")
        gb = self.config.group_bytes
        if self._cipher is not None:
            sealed = [self._cipher.seal(raw[i * gb:(i + 1) * gb], _identity(sequence, layer, first_group + i))
                      for i in range(len(kv))]
            raw = memoryview(b"".join(sealed))
        return raw, self._checksums(raw, len(kv))

    def _checksums(self, raw: memoryview, n: int) -> np.ndarray:
        """Checksum of each row, in the calling thread: hardware CRC-32C outruns the disk, and
        spreading small rows over threads only adds GIL contention with the writer."""
        rb = self._row_bytes
        return np.fromiter((checksum(raw[i * rb:(i + 1) * rb], release_gil=True) for i in range(n)),
                           dtype=np.uint32, count=n)

    def _on_disk_full(self, path: Path, exc: OSError) -> None:
        with self._lock:
            self.stats.disk_full_events += 1
            if not self._writes_disabled:
                log.warning("kvswap store: disk full writing %s (%s); writes stop, reads continue",
                            path, exc.strerror)
            self._writes_disabled = True

    @property
    def writes_enabled(self) -> bool:
        return not self._writes_disabled

    def _check_kv(self, kv: torch.Tensor, layer: int) -> int:
        if not isinstance(kv, torch.Tensor):
            raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dim() != 5 or tuple(kv.shape[1:]) != self.config.group_shape:
            raise ValueError(f"kv must have shape (n, {', '.join(map(str, self.config.group_shape))}), "
                             f"got {tuple(kv.shape)}")
        if kv.dtype != self.config.torch_dtype:
            raise ValueError(f"kv dtype {kv.dtype} != store dtype {self.config.torch_dtype}")
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.config.num_layers})")
        if kv.shape[0] < 1:
            raise ValueError("kv holds no groups")
        return int(kv.shape[0])

    def _check_no_overlap(self, sequence: str, layer: int, first: int, n: int) -> None:
        if first < 0:
            raise ValueError(f"first_group must be >= 0, got {first}")
        stored = [(sg.info.first_group, sg.info.num_groups) for sg in self._segments.get((sequence, layer), [])]
        pending = [(f, c) for s, ly, f, c in self._pending if (s, ly) == (sequence, layer)]
        for lo, count in stored + pending:
            if first < lo + count and lo < first + n:
                raise ValueError(f"groups {first}..{first + n - 1} of {sequence}/layer {layer} overlap "
                                 f"stored groups {lo}..{lo + count - 1}")

    def _segment_path(self, sequence: str, layer: int, first_group: int) -> Path:
        return self.config.namespace / sequence / f"L{layer:03d}-G{first_group:010d}{SEGMENT_SUFFIX}"

    # ----- capacity -----------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def _make_room(self, nbytes: int) -> bool:
        cap = self.config.capacity_bytes
        if cap is None:
            return True
        if nbytes > cap:
            return False
        victims = sorted((s for segs in self._segments.values() for s in segs
                          if s.pins == 0 and s.info.sequence not in self._open_seqs), key=lambda s: s.last_used)
        for seg in victims:
            if self._used_bytes + nbytes <= cap:
                break
            self._forget(seg)
            self._drop_file(seg)
            self.stats.evicted_files += 1
            self.stats.evicted_bytes += seg.info.file_bytes
        return self._used_bytes + nbytes <= cap

    def _forget(self, seg: _Segment) -> None:
        key = (seg.info.sequence, seg.info.layer)
        self._segments[key].remove(seg)
        if not self._segments[key]:
            del self._segments[key]

    def _drop_file(self, seg: _Segment) -> None:
        if seg.file is not None:
            seg.file.close()
            seg.file = None
        seg.info.path.unlink(missing_ok=True)
        self._used_bytes -= seg.info.file_bytes
        for h in seg.info.block_hashes.values():
            if self._by_hash.get(h, (None,))[0] == seg.info.sequence:
                del self._by_hash[h]

    # ----- reads --------------------------------------------------------------------------
    def read_groups(self, sequence: str, layer: int, group_ids: Iterable[int], out: torch.Tensor | None = None) -> ReadResult:
        """Read groups of one layer of one sequence; adjacent groups become one read.

        out: optional (len(group_ids), num_kv_heads, 2, group_size, head_dim) destination
        (e.g. hot-tier slots); allocated page-aligned when omitted. Runs of groups whose file
        offsets and destination rows are 4 KiB-aligned are read straight into `out` (zero-copy);
        others are copied once from an aligned I/O buffer. Rows of groups not found are undefined.
        """
        return self.read_many([ReadRequest(sequence, layer, [int(g) for g in group_ids], out)])[0]

    def read_many(self, requests: Sequence[ReadRequest]) -> list[ReadResult]:
        """`read_groups` for several requests in one call: their reads are issued together (one
        kernel round trip with AIO), e.g. one layer's missing groups of every sequence of a batch."""
        return self.start_reads(requests).wait()

    def start_reads(self, requests: Sequence[ReadRequest]) -> "PendingReads":
        """`read_many`, started: with kernel AIO the reads are in flight when this returns, and
        the caller computes until it needs them (`wait()`, in the same thread); through thread
        lanes they are done or nearly so."""
        dsts = [_Target(r.sequence, r.layer, r.ids, self._destination(r)) for r in requests]
        t0 = time.perf_counter()
        with self._lock:
            jobs = []
            for d in dsts:
                d.extents = self._plan(d.sequence, d.layer, d.ids)
                jobs += [(ext, d) for ext in d.extents]
            for ext, _ in jobs:
                ext.seg.pins += 1
            if self._reads_in_flight == 0:
                self._busy_since = t0
            self._reads_in_flight += 1
        pending = PendingReads(self, dsts, jobs)
        try:
            pending._finish = self._start_jobs(jobs)
        except BaseException:
            pending.wait()  # unpins
            raise
        pending.waited_s += time.perf_counter() - t0
        return pending

    def _end_reads(self, pending: "PendingReads") -> None:
        """Unpin a finished read call's extents and count it."""
        dsts, jobs = pending.targets, pending.jobs
        with self._lock:
            for ext, _ in jobs:
                ext.seg.pins -= 1
            self._reads_in_flight -= 1
            if self._reads_in_flight == 0:
                self.stats.read_busy_s += time.perf_counter() - self._busy_since
            s = self.stats
            s.read_requests += len(dsts)
            s.extents_read += len(jobs)
            s.bytes_read += sum(d.nbytes for d in dsts)
            found = sum(int(np.count_nonzero(d.found)) for d in dsts)
            s.groups_read += found
            s.groups_missing += sum(len(d.found) for d in dsts) - found
            s.read_wait_s += pending.waited_s

    def _destination(self, r: ReadRequest) -> torch.Tensor:
        shape = (len(r.ids), *self.config.group_shape)
        if r.out is None:
            return fileio.aligned_tensor(shape, self.config.torch_dtype)
        if tuple(r.out.shape) != shape or r.out.dtype != self.config.torch_dtype or not r.out.is_contiguous():
            raise ValueError(f"out must be a contiguous {shape} {self.config.torch_dtype} tensor")
        return r.out

    def _start_jobs(self, jobs: list[tuple[_Extent, "_Target"]]) -> Callable[[], None]:
        """Start reading each (extent, request) job into its request; returns what finishes them
        (adding the bytes read to each request). Through kernel AIO when the store uses it; else
        thread lanes."""
        if self._aio and jobs:
            try:
                return self._start_async(jobs)
            except aio.AioError as exc:
                self._aio_failed(exc)
        return self._start_lanes(jobs)

    def _aio_failed(self, exc: aio.AioError) -> None:
        log.warning("kvswap store: kernel AIO failed (%s); reading with threads from now on", exc)
        self._aio = self.stats.kernel_aio = False

    def _start_lanes(self, jobs: list[tuple[_Extent, "_Target"]]) -> Callable[[], None]:
        """One lane per I/O thread, each reading its share of jobs in turn (as many reads in flight
        as threads, without paying a future per extent); the calling thread reads the first lane
        itself (one hand-off fewer), the others finish when waited for."""
        n = self.config.io_threads
        shares = [jobs[i::n] for i in range(min(n, len(jobs)))]
        lanes = [self._pool.submit(self._read_lane, share) for share in shares[1:]]

        def finish() -> None:
            futures_wait(lanes)  # every lane is done before its extents are unpinned
            for share, lane in zip(shares[1:], lanes):
                _add_bytes(share, lane.result())

        try:
            if shares:
                _add_bytes(shares[0], self._read_lane(shares[0]))
        except BaseException:
            futures_wait(lanes)
            raise
        return finish

    def _start_async(self, jobs: list[tuple[_Extent, "_Target"]]) -> Callable[[], None]:
        """Every job in one kernel AIO submission: straight into its request's rows where
        aligned, else into a scratch buffer of this call; an extent the kernel refuses or cuts
        short is then read the usual way (which reports what cannot be read)."""
        rb = self._row_bytes
        again: list[tuple[_Extent, _Target]] = []
        # Per read: (job, offset, length, read start, read length, buffer offset or -1: in place).
        plans: list[tuple[tuple[_Extent, _Target], int, int, int, int, int]] = []
        scratch = 0
        for ext, d in jobs:
            offset, length = ext.seg.info.data_offset + ext.first_row * rb, ext.count * rb
            try:
                f = self._file(ext.seg)
            except OSError:
                again.append((ext, d))  # the usual way says why it cannot be read
                continue
            if ext.out_start >= 0 and self._cipher is None and \
                    f.can_read_into(offset, length, d.address + ext.out_start * rb):
                plans.append(((ext, d), offset, length, offset, length, -1))
            else:
                start = fileio.align_down(offset)
                span = min(fileio.align_up(offset + length), fileio.align_up(f.size)) - start
                plans.append(((ext, d), offset, length, start, span, scratch))
                scratch += span
        buf = self._take_scratch(scratch)
        at = np.array([p[5] for p in plans], dtype=np.int64)
        in_place = np.array([p[0][1].address + p[0][0].out_start * rb for p in plans], dtype=np.int64)
        ctx = self._aio_context()
        try:
            batch = ctx.submit(
                np.array([p[0][0].seg.file.fd for p in plans], dtype=np.int64),
                np.array([p[3] for p in plans], dtype=np.int64), np.array([p[4] for p in plans], dtype=np.int64),
                np.where(at < 0, in_place, fileio.buffer_address(buf) + at))
        except BaseException:
            self._give_scratch(buf)
            raise

        def finish() -> None:
            try:
                got = ctx.wait(batch).tolist()
            except aio.AioError as exc:  # the context is gone, and with it every read in flight
                self._give_scratch(buf)
                self._aio_failed(exc)
                return self._start_lanes(jobs)()
            with torch.inference_mode():
                try:
                    for ((ext, d), offset, length, start, _, pos), n in zip(plans, got):
                        if n < offset + length - start:
                            again.append((ext, d))
                            continue
                        d.nbytes += n
                        if pos < 0:
                            self._verify_in_place(ext, d.bytes[ext.out_start * rb:ext.out_start * rb + length], d.found)
                        else:
                            self._deliver(ext, d, memoryview(buf)[pos + offset - start:][:length])
                finally:
                    self._give_scratch(buf)
                if again:
                    _add_bytes(again, self._read_lane(again))

        return finish

    def _take_scratch(self, nbytes: int) -> mmap.mmap:
        """An aligned buffer of at least `nbytes` for one read call (calls in flight together
        each need their own; returned ones are reused: no page faults after warm-up)."""
        with self._lock:
            for i, buf in enumerate(self._scratch):
                if len(buf) >= nbytes:
                    return self._scratch.pop(i)
        return fileio.aligned_buffer(max(nbytes, 1 << 20))

    def _give_scratch(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._scratch.append(buf)

    def _aio_context(self) -> aio.AsyncReads:
        ctx = getattr(self._aio_local, "ctx", None)
        if ctx is None:
            ctx = self._aio_local.ctx = aio.AsyncReads()
            with self._lock:
                self._aio_contexts.append(ctx)
        return ctx

    def _plan(self, sequence: str, layer: int, ids: list[int]) -> list[_Extent]:
        """Group the requested ids by file, then into runs of adjacent rows (one read each).

        One pass over the ids in ascending order, in plain Python: a decode step plans a few
        dozen ids per layer, for which numpy's per-call overhead cost 10x more (~0.18 ms a call)."""
        segs = self._segments.get((sequence, layer), [])
        if not segs or not ids:
            return []
        starts = [sg.info.first_group for sg in segs]
        # Two requested rows share a read when at most `read_gap_bytes` of rows lie between them
        # (duplicates always do; without coalescing, nothing else does); runs are cut every
        # max_read_bytes, counted from the run's first row.
        widest = self.config.read_gap_bytes // self._row_bytes + 1 if self.config.coalesce_reads else 0
        chunk = max(1, self.config.max_read_bytes // self._row_bytes)
        out: list[_Extent] = []
        ext: _Extent | None = None
        run_start = piece = last = last_pos = in_order = 0
        for pos in sorted(range(len(ids)), key=ids.__getitem__):
            g = ids[pos]
            s = bisect.bisect_right(starts, g) - 1
            if s < 0 or g > segs[s].info.last_group:
                continue  # not stored: found stays False
            seg = segs[s]
            if ext is not None and ext.seg is seg and g - last <= widest and (g - run_start) // chunk == piece:
                in_order = in_order and g == last + 1 and pos == last_pos + 1
                ext.count = g - seg.info.first_group - ext.first_row + 1
                ext.out_pos.append(pos)
            else:
                if ext is not None:
                    out.append(self._finish_extent(ext, in_order))
                if ext is None or ext.seg is not seg or g - last > widest:
                    run_start = g
                piece, in_order = (g - run_start) // chunk, True
                ext = _Extent(seg, g - seg.info.first_group, 1, [pos])
            last, last_pos = g, pos
        if ext is not None:
            out.append(self._finish_extent(ext, in_order))
        return out

    @staticmethod
    def _finish_extent(ext: _Extent, in_order: bool) -> _Extent:
        """An extent fills consecutive request positions when each of its rows was requested
        once, in order."""
        if in_order and len(ext.out_pos) == ext.count:
            ext.out_start = ext.out_pos[0]
        return ext

    def _read_lane(self, jobs: list[tuple[_Extent, "_Target"]]) -> list[int]:
        """Bytes read per job, reading them in turn."""
        # Inference mode is per thread: without it, filling a tensor the caller made under
        # torch.inference_mode() would be refused.
        with torch.inference_mode():
            return [self._read_extent(ext, d) for ext, d in jobs]

    def _read_extent(self, ext: _Extent, dst: "_Target") -> int:
        info, rb = ext.seg.info, self._row_bytes
        offset, length = info.data_offset + ext.first_row * rb, ext.count * rb
        # Rows of requested groups in order land at dst.bytes[start:start + length].
        start = ext.out_start * rb
        try:
            f = self._file(ext.seg)
            if self._throttle is not None:
                self._throttle.wait(length)
            if ext.out_start >= 0 and self._cipher is None and f.can_read_into(offset, length, dst.address + start):
                nread = f.read_into(offset, dst.bytes[start:start + length])  # zero-copy
                self._verify_in_place(ext, dst.bytes[start:start + length], dst.found)
                return nread
            view, nread = f.read_extent(offset, length)
        except (OSError, FormatError) as exc:
            log.warning("kvswap store: read of %s failed (%s); treating its groups as missing", info.path, exc)
            return 0
        self._deliver(ext, dst, view)
        return nread

    def _deliver(self, ext: _Extent, dst: "_Target", view: memoryview) -> None:
        """Verify the extent's rows read into `view` and copy the intact requested ones to `dst`."""
        info, rb = ext.seg.info, self._row_bytes
        self._touch(ext.seg)
        expected = info.crc32c[ext.first_row:ext.first_row + ext.count]
        if ext.out_start >= 0 and self._cipher is None and \
                [checksum(view[r * rb:(r + 1) * rb]) for r in range(ext.count)] == expected.tolist():
            # The common case: a run of requested groups, all intact, landing in consecutive rows
            # (a memoryview copy: per extent, torch's per-call overhead cost more than the bytes).
            start = ext.out_start * rb
            dst.bytes[start:start + len(view)] = view
            dst.found[ext.out_start:ext.out_start + ext.count] = True
            return
        pos = np.asarray(ext.out_pos)
        rel = np.asarray([dst.ids[p] for p in ext.out_pos]) - info.first_group - ext.first_row
        # Only requested rows are verified: a run may read through rows nobody asked for.
        ok = np.zeros(ext.count, dtype=bool)
        for r in np.unique(rel).tolist():
            ok[r] = checksum(view[r * rb:(r + 1) * rb]) == expected[r]
            if not ok[r]:
                self._count_checksum_failure(info, info.first_group + ext.first_row + r)
        if self._cipher is not None:
            return self._open_sealed(info, ext, view, ok, pos, rel, dst)
        # Row by row: an extent read through gaps holds a few requested rows, and a memoryview
        # copy per row costs far less than one tensor indexing call per extent.
        for p, r in zip(pos.tolist(), rel.tolist()):
            if ok[r]:
                dst.bytes[p * rb:(p + 1) * rb] = view[r * rb:(r + 1) * rb]
                dst.found[p] = True

    def _verify_in_place(self, ext: _Extent, dest: memoryview, found: np.ndarray) -> None:
        """An extent read straight into the caller's rows: mark the intact ones found."""
        info, rb = ext.seg.info, self._row_bytes
        self._touch(ext.seg)
        ok = np.fromiter((checksum(dest[r * rb:(r + 1) * rb]) for r in range(ext.count)), np.uint32, ext.count) \
            == info.crc32c[ext.first_row:ext.first_row + ext.count]
        found[ext.out_start:ext.out_start + ext.count] = ok
        for r in np.flatnonzero(~ok):
            self._count_checksum_failure(info, info.first_group + ext.first_row + int(r))

    def _open_sealed(self, info: SegmentInfo, ext: _Extent, view: memoryview, ok: np.ndarray, pos: np.ndarray,
                     rel: np.ndarray, dst: "_Target") -> None:
        rb, gb = self._row_bytes, self.config.group_bytes
        for p, r in zip(pos.tolist(), rel.tolist()):
            if not ok[r]:
                continue
            gid = info.first_group + ext.first_row + r
            plain = self._cipher.open(view[r * rb:(r + 1) * rb], _identity(dst.sequence, dst.layer, gid))  # type: ignore[union-attr]
            if plain is None:
                self._count_checksum_failure(info, gid)
                continue
            dst.rows[p, :gb].copy_(torch.frombuffer(bytearray(plain), dtype=torch.uint8))
            dst.found[p] = True

    def _count_checksum_failure(self, info: SegmentInfo, gid: int) -> None:
        log.warning("kvswap store: checksum mismatch in %s group %d; not served", info.path, gid)
        with self._lock:
            self.stats.checksum_failures += 1

    def _file(self, seg: _Segment) -> fileio.ReadFile:
        with self._lock:
            if seg.file is None:
                seg.file = fileio.ReadFile.open(seg.info.path, self._direct)
            return seg.file

    def _touch(self, seg: _Segment) -> None:
        now = time.time()
        if now - seg.last_used > _TOUCH_INTERVAL_S:
            try:
                os.utime(seg.info.path, (now, now))  # persists the LRU order across restarts
            except OSError:
                pass
        seg.last_used = now

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        for ctx in self._aio_contexts:
            ctx.close()
        with self._lock:
            for seq in list(self._private):
                self._open_seqs.pop(seq, None)
                self._private.discard(seq)
                self.delete_sequence(seq)
            for segs in self._segments.values():
                for seg in segs:
                    if seg.file is not None:
                        seg.file.close()
                        seg.file = None

    def __enter__(self) -> "DiskStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingReads:
    """A read call started by `DiskStore.start_reads`. Until `wait()` returns, reads may be in
    flight into the requests' memory, which this object keeps alive; dropped without a wait,
    it waits first."""

    def __init__(self, store: DiskStore, targets: list[_Target], jobs: list[tuple[_Extent, _Target]]) -> None:
        self.store, self.targets, self.jobs = store, targets, jobs
        self._finish: Callable[[], None] | None = None
        self._results: list[ReadResult] | None = None
        self.waited_s = 0.0  # the caller's time in start_reads and wait

    def wait(self) -> list[ReadResult]:
        """Per request, what was read (the same as `read_many`)."""
        if self._results is None:
            t0 = time.perf_counter()
            try:
                if self._finish is not None:
                    finish, self._finish = self._finish, None
                    finish()
            finally:
                self.waited_s += time.perf_counter() - t0
                self._results = [d.result() for d in self.targets]
                self.store._end_reads(self)
        return self._results

    def __del__(self) -> None:
        if self._results is None:
            try:
                self.wait()
            except Exception:  # noqa: BLE001 - nobody is left to report it to
                pass


def _add_bytes(jobs: list[tuple[_Extent, _Target]], got: list[int]) -> None:
    for (_, d), n in zip(jobs, got):
        d.nbytes += n


def _resolved(value: bool) -> Future[bool]:
    fut: Future[bool] = Future()
    fut.set_result(value)
    return fut


def _identity(sequence: str, layer: int, group: int) -> bytes:
    return f"{sequence}/{layer}/{group}".encode()


def _check_name(sequence: str) -> None:
    if not sequence or "/" in sequence or sequence.startswith(".") or len(sequence) > 200:
        raise ValueError(f"invalid sequence name {sequence!r}: non-empty, no '/', not starting with '.'")


def stored_block_hashes(config: StoreConfig) -> set[bytes]:
    """Block hashes stored for every layer present under config's namespace, read from the file
    footers only and without changing anything (a second process may be writing there)."""
    layers_of: dict[bytes, set[int]] = {}
    layers: set[int] = set()
    if not config.namespace.is_dir():
        return set()
    for path in config.namespace.rglob(f"*{SEGMENT_SUFFIX}"):
        try:
            info = open_segment(path, config)
        except (FormatError, OSError):
            continue  # damaged or foreign: the store that owns the folder deals with it
        layers.add(info.layer)
        for h in info.block_hashes.values():
            layers_of.setdefault(h, set()).add(info.layer)
    return {h for h, seen in layers_of.items() if seen == layers}
