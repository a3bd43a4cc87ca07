"""Linux kernel AIO for O_DIRECT reads: a whole set of reads goes to the device in one system
call (io_submit) and is collected in another (io_getevents).

Why: a decode step reads a few thousand scattered groups of 6-12 KiB. Issued one preadv at a
time from Python threads, each read costs ~25-35 us of CPU (the syscall plus the Python around
it, holding the GIL), and on a small machine that CPU is the model's. Measured on the 2-core dev
VM, 140 random 8-12 KiB reads of one file: kernel AIO 2.3-3.2 ms wall and 0.4-0.6 ms CPU; eight
threads calling preadv 3.2 ms wall and 2.1 ms CPU; one thread 7.6-9.9 ms wall, 3.3-4.3 ms CPU.

The kernel ABI is used through ctypes (no compiled code): the raw syscalls, `struct iocb` and
`struct io_event` as numpy record types. Where the ABI is not known (another architecture) or
the kernel refuses (no AIO, a container without it), `available()` says False and the store
reads with its thread lanes instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

import numpy as np

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS: dict[str, tuple[int, int, int, int]] = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),  # the generic syscall table (Jetson, Apple silicon VMs, Graviton)
}
_IOCB_CMD_PREAD = 0
# struct iocb and struct io_event of <linux/aio_abi.h>, little-endian 64-bit layout.
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<u4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])
EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
#: Reads in flight per context (a larger set waits for room as it is submitted).
DEFAULT_DEPTH = 256


class AioError(OSError):
    """Kernel AIO cannot be used (set up, or a whole batch refused)."""


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.syscall.restype = ctypes.c_long
    return libc


_LIBC = _libc() if platform.system() == "Linux" else None
_NUMBERS = _SYSCALLS.get(platform.machine()) if _LIBC is not None and np.little_endian else None
_available: bool | None = None


def available() -> bool:
    """Whether this machine's kernel takes AIO reads (checked once, by setting up a context)."""
    global _available
    if _available is None:
        try:
            AsyncReads(1).close()
            _available = True
        except AioError:
            _available = False
    return _available


class AioBatch:
    """Reads submitted together (`AsyncReads.submit`); `result` per read, bytes read or
    -errno, is final once `AsyncReads.wait` returned it."""

    __slots__ = ("id", "result", "pending")

    def __init__(self, batch_id: int, n: int) -> None:
        self.id, self.result, self.pending = batch_id, np.zeros(n, dtype=np.int64), 0


class AsyncReads:
    """One kernel AIO context. `submit` issues a set of reads and returns at once; `wait` returns
    when that set is done; several sets may be in flight (each event names its set), so a
    caller can compute while its reads run. Not for concurrent use by several threads (each
    takes its own context)."""

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        if _NUMBERS is None:
            raise AioError(errno.ENOSYS, f"kernel AIO is not supported here ({platform.system()} {platform.machine()})")
        self.depth = depth
        self._ctx = ctypes.c_ulong(0)
        if _LIBC.syscall(_NUMBERS[0], ctypes.c_long(depth), ctypes.byref(self._ctx)) != 0:
            err = ctypes.get_errno()
            raise AioError(err, f"io_setup failed: {os.strerror(err)}")
        self._events = np.zeros(depth, EVENT)
        self._batches: dict[int, AioBatch] = {}  # sets with reads in flight
        self._next_id = 0

    def read(self, fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, addresses: np.ndarray) -> np.ndarray:
        """Read lengths[i] bytes at offsets[i] of fds[i] into memory at addresses[i] and wait
        (see `submit`). Returns per read the bytes read, or -errno."""
        return self.wait(self.submit(fds, offsets, lengths, addresses))

    def submit(self, fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, addresses: np.ndarray) -> AioBatch:
        """Start reading lengths[i] bytes at offsets[i] of fds[i] into memory at addresses[i]
        (O_DIRECT: all 4 KiB-aligned; the memory alive and writable until `wait` returns). A
        read the kernel refuses gets -errno at once; when the queue is full, finished events
        are collected to make room."""
        if not self._ctx.value:
            raise AioError(errno.EBADF, "the AIO context is closed")
        n = len(fds)
        self._next_id += 1
        batch = AioBatch(self._next_id, n)
        cbs = np.zeros(n, IOCB)  # the kernel copies each iocb when it is submitted
        cbs["opcode"] = _IOCB_CMD_PREAD
        cbs["data"] = (batch.id << 32) | np.arange(n, dtype=np.uint64)
        cbs["fildes"], cbs["offset"], cbs["nbytes"], cbs["buf"] = fds, offsets, lengths, addresses
        ptrs = cbs.ctypes.data + np.arange(n, dtype=np.uint64) * IOCB.itemsize
        self._batches[batch.id] = batch
        pos = 0
        try:
            while pos < n:
                # io_submit takes an array of pointers to iocbs
                got = _LIBC.syscall(_NUMBERS[3], self._ctx, ctypes.c_long(min(n - pos, self.depth)),
                                    ctypes.c_void_p(ptrs.ctypes.data + pos * ptrs.itemsize))
                if got > 0:
                    pos, batch.pending = pos + got, batch.pending + got
                    continue
                err = ctypes.get_errno() if got < 0 else errno.EAGAIN
                if err == errno.EINTR:
                    continue
                if err == errno.EAGAIN and self._in_flight():
                    self._reap(1)  # let the queue drain, then go on
                    continue
                batch.result[pos] = -err  # this read is refused (the caller reads it another way)
                pos += 1
        except BaseException:
            self.close()  # reads in flight into caller memory: io_destroy waits for them
            raise
        if not batch.pending:
            del self._batches[batch.id]
        return batch

    def wait(self, batch: AioBatch) -> np.ndarray:
        """Per read of `batch`: bytes read, or -errno."""
        try:
            while batch.pending:
                self._reap(batch.pending)
        except BaseException:
            self.close()
            raise
        return batch.result

    def _in_flight(self) -> int:
        return sum(b.pending for b in self._batches.values())

    def _reap(self, wanted: int) -> None:
        """Collect at least min(wanted, in flight) finished reads, of any set."""
        wanted = min(wanted, self.depth)
        got = _LIBC.syscall(_NUMBERS[2], self._ctx, ctypes.c_long(wanted), ctypes.c_long(self.depth),
                            ctypes.c_void_p(self._events.ctypes.data), None)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                return
            raise AioError(err, f"io_getevents failed: {os.strerror(err)}")
        ev = self._events[:got]
        idx = (ev["data"] & 0xFFFFFFFF).astype(np.int64)
        if len(self._batches) == 1:  # the common case: every event is of the one set in flight
            (bid, batch), = self._batches.items()
            batch.result[idx] = ev["res"]
            batch.pending -= got
            if not batch.pending:
                del self._batches[bid]
            return
        ids = (ev["data"] >> 32).astype(np.int64)
        for bid in np.unique(ids).tolist():
            batch, mine = self._batches[bid], ids == bid
            batch.result[idx[mine]] = ev["res"][mine]
            batch.pending -= int(mine.sum())
            if not batch.pending:
                del self._batches[bid]

    def close(self) -> None:
        if self._ctx.value:
            _LIBC.syscall(_NUMBERS[1], self._ctx)  # waits for reads in flight
            self._ctx = ctypes.c_ulong(0)
            for batch in self._batches.values():
                batch.pending = 0
            self._batches.clear()

    def __del__(self) -> None:
        if _LIBC is not None:  # None at interpreter exit, where the kernel frees the context itself
            self.close()
