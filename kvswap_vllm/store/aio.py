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
#: Reads in flight per context; larger sets go in several rounds.
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


class AsyncReads:
    """One kernel AIO context: `read` issues a set of reads and returns when all are done.
    Not for concurrent use by several threads (each takes its own context)."""

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        if _NUMBERS is None:
            raise AioError(errno.ENOSYS, f"kernel AIO is not supported here ({platform.system()} {platform.machine()})")
        self.depth = depth
        self._ctx = ctypes.c_ulong(0)
        if _LIBC.syscall(_NUMBERS[0], ctypes.c_long(depth), ctypes.byref(self._ctx)) != 0:
            err = ctypes.get_errno()
            raise AioError(err, f"io_setup failed: {os.strerror(err)}")
        self._iocbs = np.zeros(depth, IOCB)
        self._iocbs["opcode"] = _IOCB_CMD_PREAD
        self._ptrs = self._iocbs.ctypes.data + np.arange(depth, dtype=np.uint64) * IOCB.itemsize
        self._events = np.zeros(depth, EVENT)

    def read(self, fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, addresses: np.ndarray) -> np.ndarray:
        """Read lengths[i] bytes at offsets[i] of fds[i] into memory at addresses[i] (O_DIRECT:
        all 4 KiB-aligned, the memory alive and writable until this returns). Returns per read
        the bytes read, or -errno for a read the kernel refused or failed."""
        n = len(fds)
        out = np.zeros(n, dtype=np.int64)
        for lo in range(0, n, self.depth):
            hi = min(n, lo + self.depth)
            out[lo:hi] = self._round(fds[lo:hi], offsets[lo:hi], lengths[lo:hi], addresses[lo:hi])
        return out

    def _round(self, fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, addresses: np.ndarray) -> np.ndarray:
        n = len(fds)
        cbs = self._iocbs[:n]
        cbs["data"] = np.arange(n)
        cbs["fildes"], cbs["offset"], cbs["nbytes"], cbs["buf"] = fds, offsets, lengths, addresses
        res = np.zeros(n, dtype=np.int64)
        queued = 0
        try:
            pos = 0
            while pos < n:
                # io_submit takes an array of pointers to iocbs
                got = _LIBC.syscall(_NUMBERS[3], self._ctx, ctypes.c_long(n - pos),
                                    ctypes.c_void_p(self._ptrs.ctypes.data + pos * self._ptrs.itemsize))
                if got > 0:
                    pos, queued = pos + got, queued + got
                    continue
                err = ctypes.get_errno() if got < 0 else errno.EAGAIN
                if err == errno.EINTR:
                    continue
                if err == errno.EAGAIN and queued:
                    self._collect(queued, res)  # let the queue drain, then go on
                    queued = 0
                    continue
                res[pos] = -err  # this read is refused (the caller reads it another way); the others go
                pos += 1
            self._collect(queued, res)
            queued = 0
        finally:
            if queued:  # interrupted (a signal's exception) with reads in flight into caller memory:
                self.close()  # io_destroy waits for them before anything can free that memory
        return res

    def _collect(self, count: int, res: np.ndarray) -> None:
        done = 0
        while done < count:
            got = _LIBC.syscall(_NUMBERS[2], self._ctx, ctypes.c_long(count - done), ctypes.c_long(count - done),
                                ctypes.c_void_p(self._events.ctypes.data), None)
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise AioError(err, f"io_getevents failed: {os.strerror(err)}")
            ev = self._events[:got]
            res[ev["data"].astype(np.int64)] = ev["res"]
            done += got

    def close(self) -> None:
        if self._ctx.value:
            _LIBC.syscall(_NUMBERS[1], self._ctx)
            self._ctx = ctypes.c_ulong(0)

    def __del__(self) -> None:
        self.close()
