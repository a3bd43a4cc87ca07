"""Low-level file I/O: O_DIRECT with aligned buffers, atomic private writes, extent reads."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvswap_vllm.store.errors import ShortReadError, StoreError

if TYPE_CHECKING:
    import torch

#: O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical block size;
#: 4 KiB covers every device we target.
ALIGN = 4096
FILE_MODE = 0o600
DIR_MODE = 0o700


def align_down(x: int) -> int:
    return x - x % ALIGN


def align_up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory (what O_DIRECT needs), never backed by the page cache."""
    return mmap.mmap(-1, max(ALIGN, align_up(nbytes)))


def buffer_address(buf: mmap.mmap) -> int:
    """Address of a writable buffer's first byte (for the kernel to read into)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def aligned_tensor(shape: tuple[int, ...], dtype: "torch.dtype") -> "torch.Tensor":
    """An uninitialised tensor in page-aligned memory: O_DIRECT reads can land in it directly."""
    import torch

    nbytes = max(1, int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size())
    return torch.frombuffer(aligned_buffer(nbytes), dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


def drop_page_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to forget cached pages of a file (buffered fallback, written files)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def direct_io_supported(folder: Path) -> bool:
    """Whether files in `folder` accept O_DIRECT reads (tmpfs, for one, does not)."""
    probe = folder / f".kvswap-odirect-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * ALIGN)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        probe.unlink(missing_ok=True)
        return False
    try:
        buf = aligned_buffer(ALIGN)
        return os.preadv(fd, [buf], 0) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


@dataclass
class ReadFile:
    """An open block file for reads: O_DIRECT when possible, else buffered with DONTNEED."""

    fd: int
    direct: bool
    size: int

    @classmethod
    def open(cls, path: Path, direct: bool) -> "ReadFile":
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags)
        return cls(fd=fd, direct=direct, size=os.fstat(fd).st_size)

    def read_extent(self, offset: int, length: int) -> tuple[memoryview, int]:
        """Bytes [offset, offset+length) and the bytes read; the view is into this thread's
        reusable buffer, valid until the thread's next read."""
        start, end = align_down(offset), min(align_up(offset + length), align_up(self.size))
        buf = thread_buffer(end - start)
        view = memoryview(buf)[: end - start]
        got = 0
        while got < end - start:
            n = os.preadv(self.fd, [view[got:]], start + got)
            if n == 0:
                break
            got += n
        if got < offset + length - start:
            raise ShortReadError(f"short read: wanted bytes up to {offset + length}, file ends at {start + got}")
        if not self.direct:
            drop_page_cache(self.fd, start, end - start)
        return view[offset - start: offset - start + length], got

    def read_into(self, offset: int, dest: memoryview) -> int:
        """Read len(dest) bytes at `offset` straight into `dest` (zero-copy; with O_DIRECT, offset,
        length and address must be 4 KiB-aligned, see `can_read_into`)."""
        got = 0
        while got < len(dest):
            n = os.preadv(self.fd, [dest[got:]], offset + got)
            if n == 0:
                raise ShortReadError(f"short read: wanted bytes up to {offset + len(dest)}, file ends at {offset + got}")
            got += n
        if not self.direct:
            drop_page_cache(self.fd, offset, len(dest))
        return got

    def can_read_into(self, offset: int, length: int, address: int) -> bool:
        return not self.direct or (offset % ALIGN == 0 and length % ALIGN == 0 and address % ALIGN == 0)

    def close(self) -> None:
        os.close(self.fd)


def ensure_private_dir(path: Path, root: Path) -> None:
    """Create `path` and every folder between `root` and it mode 0700; refuse symlinks and shared folders."""
    check_private_dir(root, create=True)
    current = root
    for name in path.relative_to(root).parts:
        current = current / name
        check_private_dir(current, create=True)


def check_private_dir(path: Path, create: bool) -> None:
    if path.is_symlink():
        raise StoreError(f"refusing cache folder {path}: it is a symlink (point the store at the real folder)")
    if not path.exists():
        if not create:
            raise StoreError(f"cache folder {path} does not exist")
        try:
            path.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
            os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise StoreError(f"cannot create cache folder {path}: {exc.strerror or exc}") from exc
    st = path.stat()
    if not os.path.isdir(path):
        raise StoreError(f"cache path {path} is not a folder")
    if st.st_mode & 0o022:
        raise StoreError(f"refusing cache folder {path}: writable by group or others (mode {st.st_mode & 0o777:o}); "
                         "chmod 700 it")
    if st.st_uid != os.getuid():
        raise StoreError(f"refusing cache folder {path}: owned by uid {st.st_uid}, not by this user")


def write_atomic(path: Path, pieces: list[tuple[int, memoryview]] | tuple[tuple[int, memoryview], ...]) -> None:
    """Write a new private file from (offset, bytes) pieces: temp file, fsync, rename.

    The 4 KiB-aligned part of each piece whose offset and memory are page-aligned goes out with
    O_DIRECT (no page cache, no copy) where the file system allows it; the rest is written
    buffered and dropped from the page cache after the fsync. A crash at any instant leaves
    either no file or the whole file under `path`; temp files start with ".tmp-" and are
    removed by the store. ENOSPC is raised as OSError.
    """
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    dfd = -1
    try:
        for offset, data in pieces:
            view = memoryview(data).cast("B")
            done = 0
            if offset % ALIGN == 0 and align_down(len(view)) and _page_aligned(view):
                if dfd < 0:
                    dfd = _open_direct(tmp)
                if dfd >= 0:
                    done = _pwrite_all(dfd, view[: align_down(len(view))], offset)
            _pwrite_all(fd, view[done:], offset + done)
        os.fsync(fd)
        drop_page_cache(fd)  # written KV must not sit in the page cache either
        # The data is durable before the rename, so the name never points at partial bytes.
        # The folder is not fsynced: a power cut may forget the newest files (it is a cache),
        # and a folder fsync per file would cost a journal commit each.
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        if dfd >= 0:
            os.close(dfd)


def _open_direct(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # no O_DIRECT on this file system
            return -2
        raise


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def _page_aligned(view: memoryview) -> bool:
    import ctypes

    if view.readonly:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


_local = threading.local()


def thread_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned buffer reused by the calling thread (no page faults after warm-up);
    its contents are valid until the thread's next call."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = aligned_buffer(max(nbytes, 1 << 20))
        _local.buf = buf
    return buf


def in_memory_fs(path: Path) -> bool:
    """Whether `path` is on a file system held in memory (tmpfs, ramfs), from the mount table:
    reads there are memory copies that never wait for a device."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    target, best, fstype = str(Path(path).resolve()), "", ""
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, rest.split()[0]
    return fstype in ("tmpfs", "ramfs")


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
