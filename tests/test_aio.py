"""Kernel AIO reads (store/aio.py) on real files, and the store's use of them: same bytes as
preadv, errors per read, and every failure falls back to the thread path without losing groups."""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvswap_vllm.store import DiskStore, StoreConfig, aio
from kvswap_vllm.store.fileio import buffer_address, direct_io_supported

pytestmark = pytest.mark.skipif(not aio.available(), reason="no kernel AIO on this machine")
FP = "0123456789abcdef" * 2


@pytest.fixture
def direct_file(tmp_path: Path) -> tuple[int, bytes]:
    if not direct_io_supported(tmp_path):
        pytest.skip("no O_DIRECT here")
    data = os.urandom(64 * 4096 + 1000)  # not a whole number of pages: the last read is short
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    yield fd, data
    os.close(fd)


def test_reads_land_where_asked_in_several_rounds(direct_file) -> None:
    fd, data = direct_file
    reads = AsyncBuffer(40)
    offsets = np.random.default_rng(0).permutation(63)[:40] * 4096
    got = aio.AsyncReads(depth=16).read(np.full(40, fd), offsets, np.full(40, 8192), reads.addresses(8192))
    assert got.tolist() == [8192] * 40
    for i, off in enumerate(offsets.tolist()):
        assert reads.chunk(i, 8192) == data[off:off + 8192]


def test_each_read_reports_its_own_error_or_short_length(direct_file) -> None:
    fd, data = direct_file
    reads = AsyncBuffer(4)
    got = aio.AsyncReads(depth=4).read(np.array([fd, 987654, fd, fd]), np.array([0, 0, 100, 64 * 4096]),
                                       np.array([4096, 4096, 4096, 8192]), reads.addresses(8192))
    assert got.tolist() == [4096, -errno.EBADF, -errno.EINVAL, 1000]  # the file ends 1000 B into that page
    assert reads.chunk(0, 4096) == data[:4096] and reads.chunk(3, 1000) == data[64 * 4096:]


def test_several_sets_in_flight_each_wait_returns_its_own(direct_file) -> None:
    """Sets submitted one after another and waited for in any order: each gets its own reads
    (a queue smaller than both sets together makes the second submit collect the first's)."""
    fd, data = direct_file
    reads = AsyncBuffer(24)
    ctx = aio.AsyncReads(depth=16)
    offsets = np.random.default_rng(1).permutation(63)[:24] * 4096
    addresses = reads.addresses(8192)
    first = ctx.submit(np.full(12, fd), offsets[:12], np.full(12, 8192), addresses[:12])
    second = ctx.submit(np.full(12, fd), offsets[12:], np.full(12, 8192), addresses[12:])
    assert ctx.wait(second).tolist() == [8192] * 12 and ctx.wait(first).tolist() == [8192] * 12
    for i, off in enumerate(offsets.tolist()):
        assert reads.chunk(i, 8192) == data[off:off + 8192]
    ctx.close()
    with pytest.raises(aio.AioError):
        ctx.submit(np.full(1, fd), offsets[:1], np.full(1, 8192), addresses[:1])


class AsyncBuffer:
    """Page-aligned memory for n reads of up to `stride` bytes each."""

    def __init__(self, n: int, stride: int = 8192) -> None:
        self.buf, self.stride = mmap.mmap(-1, n * stride), stride

    def addresses(self, stride: int) -> np.ndarray:
        return buffer_address(self.buf) + np.arange(len(self.buf) // stride, dtype=np.int64) * stride

    def chunk(self, i: int, n: int) -> bytes:
        return bytes(self.buf[i * self.stride:i * self.stride + n])


def _store(tmp_path: Path, **kw) -> DiskStore:
    cfg = StoreConfig(root=tmp_path / "kv", model_fingerprint=FP, num_layers=1, num_kv_heads=3, head_dim=64,
                      group_size=4, **kw)
    return DiskStore(cfg)


def test_store_reads_through_kernel_aio_where_it_can(tmp_path: Path) -> None:
    kv = torch.randn(64, 3, 2, 4, 64)
    with _store(tmp_path) as s:
        if not s.stats.direct_io:
            pytest.skip("no O_DIRECT here")
        assert s.stats.kernel_aio
        s.open_sequence("a", private=False)
        s.write_groups("a", 0, 0, kv)
        ids = [3, 4, 5, 17, 40, 41, 63]
        r = s.read_groups("a", 0, ids)
        assert r.found.all() and torch.equal(r.kv, kv[ids])
    with _store(tmp_path, kernel_aio=False) as s:
        assert not s.stats.kernel_aio and torch.equal(s.read_groups("a", 0, ids).kv, kv[ids])


def test_refused_or_short_reads_are_read_again_with_preadv(tmp_path: Path, monkeypatch) -> None:
    """The kernel refusing a read (here: every other one) costs it a second, ordinary read."""
    real = aio.AsyncReads.wait

    def flaky(self, batch):
        got = real(self, batch)
        got[::2] = -errno.EAGAIN
        return got

    kv = torch.randn(64, 3, 2, 4, 64)
    with _store(tmp_path, read_gap_bytes=0) as s:
        if not s.stats.kernel_aio:
            pytest.skip("the store does not use kernel AIO here")
        s.open_sequence("a", private=False)
        s.write_groups("a", 0, 0, kv)
        monkeypatch.setattr(aio.AsyncReads, "wait", flaky)
        ids = [1, 9, 20, 33, 50]
        r = s.read_groups("a", 0, ids)
        assert r.found.all() and torch.equal(r.kv, kv[ids]) and r.extents == 5


@pytest.mark.parametrize("step", ["submit", "wait"])
def test_a_failing_aio_context_switches_the_store_to_threads(tmp_path: Path, monkeypatch, caplog, step) -> None:
    def broken(self, *args):
        self.close()  # as the context does when a call fails with reads in flight
        raise aio.AioError(errno.EIO, f"io_{step} failed")

    kv = torch.randn(16, 3, 2, 4, 64)
    with _store(tmp_path) as s:
        if not s.stats.kernel_aio:
            pytest.skip("the store does not use kernel AIO here")
        s.open_sequence("a", private=False)
        s.write_groups("a", 0, 0, kv)
        monkeypatch.setattr(aio.AsyncReads, step, broken)
        with caplog.at_level(logging.WARNING, logger="kvswap_vllm.store.disk_store"):
            r = s.read_groups("a", 0, [2, 7])
            r2 = s.read_groups("a", 0, [3])
        assert r.found.all() and torch.equal(r.kv, kv[[2, 7]]) and torch.equal(r2.kv, kv[[3]])
        assert not s.stats.kernel_aio
        assert sum("kernel AIO failed" in m for m in caplog.messages) == 1


def test_a_disk_tier_in_memory_reads_through_kernel_aio_without_o_direct(tmp_path: Path) -> None:
    """tmpfs: buffered reads are memory copies, which never block io_submit; the store takes the
    same AIO path as on a disk with O_DIRECT (the compute-only benchmark runs there)."""
    from kvswap_vllm.store.fileio import in_memory_fs
    from tests.helpers import tmpfs

    assert not in_memory_fs(Path("/proc/self"))
    kv = torch.randn(32, 3, 2, 4, 64)
    with tmpfs(tmp_path / "ram", "64m") as ram:
        assert in_memory_fs(ram) and in_memory_fs(ram / "not" / "yet")
        with _store(ram, direct_io="off") as s:
            assert not s.stats.direct_io and s.stats.kernel_aio
            s.open_sequence("a", private=False)
            s.write_groups("a", 0, 0, kv)
            ids = [0, 5, 6, 31, 17]
            r = s.read_groups("a", 0, ids)
            assert r.found.all() and torch.equal(r.kv, kv[ids])
