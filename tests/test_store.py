"""The disk tier on real files: one suite run over plaintext/encrypted and direct/buffered I/O."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from kvswap_vllm.store import DiskStore, FormatError, ModelMismatchError, StoreConfig
from kvswap_vllm.store.errors import StoreError
from kvswap_vllm.store.format import open_segment
from kvswap_vllm.store.profiles import PROFILES, get_profile
from tests.helpers import REPO, tmpfs

FP = "0123456789abcdef" * 2
KEY = bytes(range(32))


def make_cfg(root: Path, **kw) -> StoreConfig:
    base = dict(root=root, model_fingerprint=FP, num_layers=4, num_kv_heads=3, head_dim=64, group_size=4)
    return StoreConfig(**{**base, **kw})


def groups(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 4, 64, generator=g)


@pytest.fixture(params=["plain-direct", "plain-direct-threads", "plain-buffered", "aes-direct"])
def cfg(request, tmp_path: Path) -> StoreConfig:
    """Direct reads go through kernel AIO where the kernel has it, "-threads" through thread lanes."""
    kind = request.param
    return make_cfg(tmp_path / "kv", direct_io="off" if kind.endswith("buffered") else "auto",
                    encryption_key=KEY if kind.startswith("aes") else None, kernel_aio=not kind.endswith("threads"))


def files(cfg: StoreConfig) -> list[Path]:
    return sorted(cfg.namespace.rglob("*.arrow"))


def test_roundtrip_any_order_with_duplicates_and_misses(cfg: StoreConfig) -> None:
    kv = groups(50)
    with DiskStore(cfg) as s:
        assert s.write_groups("a", 1, 0, kv[:30]) and s.write_groups("a", 1, 30, kv[30:])
        ids = [42, 3, 3, 29, 30, 31, 99, 0]
        r = s.read_groups("a", 1, ids)
        assert r.found.tolist() == [True] * 6 + [False, True]
        for pos, gid in enumerate(ids):
            if gid < 50:
                assert torch.equal(r.kv[pos], kv[gid])
        assert s.read_groups("a", 2, [0]).found.tolist() == [False]  # another layer: nothing
        assert s.stats.direct_io == (cfg.direct_io == "auto")


def test_one_call_reads_requests_of_several_sequences_and_layers(cfg: StoreConfig) -> None:
    from kvswap_vllm.store import ReadRequest

    a, b = groups(12, seed=1), groups(12, seed=2)
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, a)
        s.write_groups("a", 1, 0, b)
        s.write_groups("b", 0, 0, b)
        out = torch.empty(3, 3, 2, 4, 64)
        res = s.read_many([ReadRequest("a", 0, [5, 1, 2]), ReadRequest("a", 1, [7, 30], None),
                           ReadRequest("b", 0, [0, 3, 11], out), ReadRequest("b", 2, [0])])
        assert [r.found.tolist() for r in res] == [[True] * 3, [True, False], [True] * 3, [False]]
        assert torch.equal(res[0].kv, a[[5, 1, 2]]) and torch.equal(res[1].kv[0], b[7])
        assert res[2].kv is out and torch.equal(out, b[[0, 3, 11]])
        assert [r.extents for r in res] == [2, 1, 3, 0] and all(r.bytes_read > 0 for r in res[:3])
        assert s.stats.read_requests == 4 and s.stats.groups_read == 7 and s.stats.groups_missing == 2


def test_read_calls_in_flight_together_each_get_their_groups(cfg: StoreConfig) -> None:
    """start_reads: several calls started before any is waited for (a batch's halves), waited in
    any order; one never waited for still unpins its files when dropped."""
    from kvswap_vllm.store import ReadRequest

    kv = groups(64, seed=3)
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, kv)
        first = s.start_reads([ReadRequest("a", 0, [1, 9, 10, 40])])
        second = s.start_reads([ReadRequest("a", 0, [2, 63, 30]), ReadRequest("a", 0, [5])])
        dropped = s.start_reads([ReadRequest("a", 0, [7, 8])])
        res2, res1 = second.wait(), first.wait()
        assert torch.equal(res1[0].kv, kv[[1, 9, 10, 40]]) and res1[0].found.all()
        assert torch.equal(res2[0].kv, kv[[2, 63, 30]]) and torch.equal(res2[1].kv, kv[[5]])
        assert first.wait() is res1  # waiting again gives the same results
        del dropped
        assert all(seg.pins == 0 for segs in s._segments.values() for seg in segs)
        assert s.stats.read_requests == 4 and s.stats.groups_read == 10


def test_async_writes_are_readable_after_flush(cfg: StoreConfig) -> None:
    kv = groups(40)
    with DiskStore(cfg) as s:
        futures = [s.write_groups_async("a", layer, 0, kv) for layer in range(4)]
        with pytest.raises(ValueError, match="overlap"):  # pending writes count as stored
            s.write_groups_async("a", 3, 10, kv[:5])
        s.flush()
        assert all(f.done() and f.result() for f in futures)
        for layer in range(4):
            assert torch.equal(s.read_groups("a", layer, range(40)).kv, kv)


def test_adjacent_groups_coalesce_into_one_read(cfg: StoreConfig) -> None:
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, groups(64))
        assert s.read_groups("a", 0, range(10, 20)).extents == 1
        assert s.read_groups("a", 0, range(0, 20, 2)).extents == 10
        assert s.read_groups("a", 0, [5, 6, 7, 40, 41]).extents == 2


def test_long_runs_split_at_max_read_bytes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "kv", max_read_bytes=10 * 6144)  # 10 groups per read
    kv = groups(64)
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, kv)
        r = s.read_groups("a", 0, range(5, 50))
        assert r.extents == 5 and r.found.all() and torch.equal(r.kv, kv[5:50])
        assert s.read_groups("a", 0, [*range(0, 12), *range(30, 33)]).extents == 3


def test_reads_through_short_gaps_but_verifies_and_returns_only_requested_groups(cfg: StoreConfig) -> None:
    cfg = dataclasses.replace(cfg, read_gap_bytes=2 * 8192)  # 6 KiB groups in 8 KiB rows: 2 rows
    kv = groups(40)
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, kv)
        info = open_segment(files(cfg)[0], cfg)
        with open(info.path, "r+b") as f:  # damage group 6, which no request below asks for
            f.seek(info.data_offset + 6 * info.row_bytes + 100)
            f.write(b"\xff\x00\xff")
        ids = [5, 8, 30, 2, 34]  # 2..8: gaps of 2 rows; 30 -> 34: a gap of 3 rows is too long
        r = s.read_groups("a", 0, ids)
        assert r.extents == 3 and r.found.all()
        assert all(torch.equal(r.kv[i], kv[g]) for i, g in enumerate(ids))
        assert s.stats.checksum_failures == 0  # the damaged row was read through, not served
        assert s.read_groups("a", 0, [6]).found.tolist() == [False] and s.stats.checksum_failures == 1


@pytest.mark.parametrize("ids", [[3, 5, 5], [5, 3, 5], [3, 3, 4], [2, 4, 4, 5], [7, 7, 7]])
def test_duplicate_ids_read_through_a_gap_land_where_requested(cfg: StoreConfig, ids: list[int]) -> None:
    """As many requested positions as rows in an extent, in order, is not the same as row i
    going to position i: with a duplicate and a gap (3, 5, 5), the planner once read rows 3, 4, 5
    straight into positions 0, 1, 2, serving group 4 for a 5."""
    cfg = dataclasses.replace(cfg, read_gap_bytes=2 * 8192)
    kv = groups(16)
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, kv)
        r = s.read_groups("a", 0, ids)
        assert r.found.all() and torch.equal(r.kv, kv[ids])


def test_survives_restart_with_block_hashes(cfg: StoreConfig) -> None:
    kv = groups(8)
    with DiskStore(cfg) as s:
        s.open_sequence("shared", private=False)
        s.write_groups("shared", 0, 0, kv, block_hashes=[None, None, None, b"blk-1", None, None, None, b"blk-2"])
        s.release_sequence("shared")
    with DiskStore(cfg) as s:
        assert s.sequences() == ["shared"] and s.num_groups("shared", 0) == 8
        assert s.find_block(b"blk-2") == ("shared", 7) and s.find_block(b"nope") is None
        assert torch.equal(s.read_groups("shared", 0, range(8)).kv, kv)


def test_plain_pyarrow_reads_documented_columns(cfg: StoreConfig) -> None:
    kv = groups(5)
    with DiskStore(cfg) as s:
        s.write_groups("a", 3, 10, kv)
    table = pa.ipc.open_file(str(files(cfg)[0])).read_all()
    assert table.column_names == ["kv", "group_id", "crc32c", "block_hash"]
    assert table.column("group_id").to_pylist() == [10, 11, 12, 13, 14]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["kvswap.format_version"] == "1" and meta["kvswap.layer"] == "3"
    assert meta["kvswap.layout"] == "H,KV,G,D" and meta["kvswap.model_fingerprint"] == FP
    if cfg.encryption_key is None:
        row = np.frombuffer(table.column("kv")[2].as_py(), dtype=np.float32).reshape(3, 2, 4, 64)
        assert np.array_equal(row, kv[2].numpy())
    else:  # ciphertext only: the plaintext bytes appear nowhere in the file
        assert kv[2].numpy().tobytes()[:64] not in files(cfg)[0].read_bytes()


def test_refuses_other_model_and_unknown_version(cfg: StoreConfig, tmp_path: Path) -> None:
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, groups(2))
    path = files(cfg)[0]
    with pytest.raises(ModelMismatchError, match="model_fingerprint"):
        open_segment(path, make_cfg(cfg.root, model_fingerprint="f" * 32, encryption_key=cfg.encryption_key))
    with pytest.raises(ModelMismatchError, match="dtype"):
        open_segment(path, make_cfg(cfg.root, dtype="float16", encryption_key=cfg.encryption_key))
    table = pa.ipc.open_file(str(path)).read_all()
    meta = dict(table.schema.metadata)
    meta[b"kvswap.format_version"] = b"99"
    future = tmp_path / "future.arrow"
    with pa.ipc.new_file(str(future), table.schema.with_metadata(meta)) as w:
        w.write_table(table.replace_schema_metadata(meta))
    with pytest.raises(FormatError, match="format version 99, this kvswap reads 1"):
        open_segment(future, cfg)
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(FormatError, match="damaged or truncated"):
        open_segment(tmp_path / "junk.arrow", cfg)


def test_corrupt_byte_is_a_counted_miss_never_served(cfg: StoreConfig) -> None:
    kv = groups(10)
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, kv)
        info = open_segment(files(cfg)[0], cfg)
        with open(info.path, "r+b") as f:  # flip one byte inside group 4
            f.seek(info.data_offset + 4 * info.row_bytes + 100)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))
        r = s.read_groups("a", 0, range(10))
        assert r.found.tolist() == [True] * 4 + [False] + [True] * 5
        assert s.stats.checksum_failures == 1
        assert torch.equal(r.kv[5:], kv[5:])


def test_truncated_file_removed_at_start_and_missing_while_running(cfg: StoreConfig) -> None:
    with DiskStore(cfg) as s:
        s.open_sequence("a", private=False)
        s.write_groups("a", 0, 0, groups(40))
        path = files(cfg)[0]
        os.truncate(path, path.stat().st_size // 2)
        r = s.read_groups("a", 0, [0, 39])
        assert r.found.tolist() == [True, False]
    with DiskStore(cfg) as s:
        assert s.stats.corrupt_files == 1 and files(cfg) == [] and s.num_groups("a", 0) == 0


WRITER = """
import sys, torch
from pathlib import Path
from tests.test_store import make_cfg
from kvswap_vllm.store import DiskStore
s = DiskStore(make_cfg(Path(sys.argv[1])))
s.open_sequence("crash", private=False)
i = 0
while True:
    s.write_groups("crash", i % 4, (i // 4) * 64, torch.full((64, 3, 2, 4, 64), float(i)))
    i += 1
"""


def test_kill_during_writes_leaves_only_whole_files(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "kv")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(cfg.root)], cwd=REPO)
    deadline = time.time() + 60
    while len(list(cfg.root.rglob("*.arrow"))) < 12 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with DiskStore(cfg) as s:
        assert s.stats.corrupt_files == 0 and not list(cfg.root.rglob(".tmp-*"))
        for layer in range(4):
            n = s.num_groups("crash", layer)
            assert n >= 64 * 2
            r = s.read_groups("crash", layer, range(n))
            assert r.found.all()
            # Every group of a file holds the value its writer put there: nothing partial.
            assert torch.equal(r.kv[:, 0, 0, 0, 0], torch.arange(n).div(64, rounding_mode="floor").float() * 4 + layer)


def test_capacity_holds_across_restarts_and_spares_open_sequences(tmp_path: Path) -> None:
    one = len(groups(16).numpy().tobytes())
    cfg = make_cfg(tmp_path / "kv", capacity_bytes=int(3.5 * one))
    with DiskStore(cfg) as s:
        s.open_sequence("pinned", private=False)
        assert s.write_groups("pinned", 0, 0, groups(16))
        for i in range(3):
            assert s.write_groups(f"old{i}", 0, 0, groups(16))
            time.sleep(0.01)
        assert s.used_bytes <= cfg.capacity_bytes and s.stats.evicted_files == 1
        assert s.sequences() == ["old1", "old2", "pinned"]
        s.release_sequence("pinned")
    with DiskStore(cfg) as s:
        assert s.used_bytes == sum(p.stat().st_size for p in files(cfg)) <= cfg.capacity_bytes
        s.open_sequence("new", private=False)
        assert s.write_groups("new", 0, 0, groups(16))
        # The mtime order survived the restart: the oldest file ("pinned", now released) went first.
        assert s.sequences() == ["new", "old1", "old2"]
        assert not s.write_groups("new", 1, 0, groups(64))  # larger than the whole capacity
        assert s.stats.capacity_rejects == 1


def test_disk_full_warns_once_stops_writing_keeps_reading(tmp_path: Path, caplog) -> None:
    with tmpfs(tmp_path / "small", "2m") as small:
        cfg = make_cfg(small / "kv")
        with caplog.at_level(logging.WARNING), DiskStore(cfg) as s:
            s.open_sequence("a", private=False)
            kv = groups(32)
            results = [s.write_groups("a", 0, 32 * i, kv) for i in range(20)]
            assert results[0] and not all(results) and not s.writes_enabled
            assert sum("disk full" in r.message for r in caplog.records) == 1
            assert s.read_groups("a", 0, range(32)).found.all()
            assert not list(small.rglob(".tmp-*"))


def test_privacy_modes_namespaces_and_private_deletion(tmp_path: Path) -> None:
    a = make_cfg(tmp_path / "kv", tenant="alice")
    b = make_cfg(tmp_path / "kv", tenant="bob")
    with DiskStore(a) as sa, DiskStore(b) as sb:
        sa.open_sequence("secret")
        sa.write_groups("secret", 0, 0, groups(2))
        sa.open_sequence("shared", private=False)
        sa.write_groups("shared", 0, 0, groups(2))
        assert sb.sequences() == [] and sb.read_groups("secret", 0, [0]).found.tolist() == [False]
        for p in [a.root, *a.root.rglob("*")]:
            mode = p.stat().st_mode & 0o777
            assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
        sa.release_sequence("secret")
        assert sa.sequences() == ["shared"] and not (a.namespace / "secret").exists()


def test_refuses_symlinked_or_shared_folders(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(StoreError, match="symlink"):
        DiskStore(make_cfg(tmp_path / "link"))
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(StoreError, match="writable by group or others"):
        DiskStore(make_cfg(shared))


def test_encrypted_group_moved_elsewhere_fails(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "kv", encryption_key=KEY)
    with DiskStore(cfg) as s:
        s.open_sequence("a", private=False)
        s.write_groups("a", 0, 0, groups(2))
    path = files(cfg)[0]
    table = pa.ipc.open_file(str(path)).read_all()
    # Swap two sealed groups together with their checksums: the CRCs pass, AES-GCM must not.
    cols = {name: table.column(name) for name in table.column_names}
    cols["kv"], cols["crc32c"] = cols["kv"].take([1, 0]), cols["crc32c"].take([1, 0])
    cols = list(cols.values())
    swapped = pa.Table.from_arrays(cols, schema=table.schema)
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(swapped)
    with DiskStore(cfg) as s:
        assert s.read_groups("a", 0, [0, 1]).found.tolist() == [False, False]
        assert s.stats.checksum_failures == 2


@pytest.mark.parametrize(
    "kw, needle",
    [({"num_layers": 0}, "num_layers"), ({"dtype": "int8"}, "dtype"), ({"tenant": "../x"}, "tenant"),
     ({"model_fingerprint": "XYZ"}, "fingerprint"), ({"capacity_bytes": 10}, "capacity"),
     ({"direct_io": "maybe"}, "direct_io"), ({"encryption_key": b"short"}, "32 bytes"),
     ({"read_gap_bytes": -1}, "read_gap_bytes"), ({"kernel_aio": "yes"}, "kernel_aio")],
)
def test_config_validation(tmp_path: Path, kw: dict, needle: str) -> None:
    with pytest.raises(StoreError, match=needle):
        make_cfg(tmp_path, **kw)


def test_write_validation(cfg: StoreConfig) -> None:
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, groups(4))
        with pytest.raises(ValueError, match="overlap"):
            s.write_groups("a", 0, 2, groups(4))
        with pytest.raises(ValueError, match="shape"):
            s.write_groups("a", 0, 10, torch.zeros(2, 3, 2, 4, 32))
        with pytest.raises(ValueError, match="dtype"):
            s.write_groups("a", 0, 10, groups(2).half())
        with pytest.raises(ValueError, match="invalid sequence name"):
            s.write_groups("../etc", 0, 0, groups(1))
        with pytest.raises(ValueError, match="layer"):
            s.write_groups("a", 9, 0, groups(1))


def test_profiles() -> None:
    assert set(PROFILES) == {"nvme", "ufs", "emmc", "sd"}
    bytes_per_token = 3 * 64 * 2 * 4
    sizes = [PROFILES[n].group_size(bytes_per_token) for n in ("nvme", "emmc", "sd")]
    assert sizes == sorted(sizes) and all(1 <= g <= 16 for g in sizes)
    with pytest.raises(StoreError, match="unknown storage profile"):
        get_profile("floppy")
    for prof in PROFILES.values():  # every profile yields a valid store configuration
        cfg = make_cfg(Path("/tmp/unused"), group_size=prof.group_size(bytes_per_token), **prof.store_settings())
        assert cfg.io_threads == min(prof.queue_depth, 16) and cfg.max_read_bytes >= prof.best_request_bytes
        # a gap is read through when that costs less than one more request's latency
        assert 0 < cfg.read_gap_bytes <= min(prof.latency_us * prof.read_mb_s, prof.best_request_bytes)


def test_throttle_emulates_a_slower_device(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "kv")
    with DiskStore(cfg) as s:
        s.open_sequence("a", private=False)
        s.write_groups("a", 0, 0, groups(200))
    sd = PROFILES["sd"]
    with DiskStore(cfg, throttle=sd.throttle()) as s:
        t0 = time.perf_counter()
        r = s.read_groups("a", 0, range(200))
        elapsed = time.perf_counter() - t0
    # 1.2 MB at 80 MB/s cannot take less than 15 ms (a lower bound, so not flaky).
    assert r.found.all() and elapsed >= r.bytes_read / (sd.read_mb_s * 1e6)


def test_read_busy_time_counts_concurrent_reads_once(tmp_path: Path) -> None:
    """read_busy_s is the time with a read in flight (I/O-only time in benchmarks): two reads
    overlapping in time count once, where read_wait_s adds both waits."""
    from concurrent.futures import ThreadPoolExecutor

    from kvswap_vllm.store.throttle import Throttle

    cfg = make_cfg(tmp_path / "kv")
    with DiskStore(cfg) as s:
        s.open_sequence("a", private=False)
        s.write_groups("a", 0, 0, groups(8))
    with DiskStore(cfg, throttle=Throttle(1e12, 0.2)) as s:  # every request waits 0.2 s
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda g: s.read_groups("a", 0, [g]), [0, 4]))
        both = s.stats.as_dict()
        s.read_groups("a", 0, [2])
        after = s.stats.as_dict()
    assert all(r.found.all() for r in results)
    assert both["read_wait_s"] >= 0.4 and 0.2 <= both["read_busy_s"] < 0.35
    assert 0.2 <= after["read_busy_s"] - both["read_busy_s"] < 0.35  # a read alone counts whole


@pytest.mark.parametrize("kernel_aio", [True, False])
def test_zero_copy_reads_land_in_aligned_rows_and_are_verified(tmp_path: Path, monkeypatch, kernel_aio: bool) -> None:
    # 3 x 2 x 8 x 64 x 4 B = 12 KiB: a 4 KiB multiple
    cfg = make_cfg(tmp_path / "kv", group_size=8, kernel_aio=kernel_aio)
    kv = torch.randn(32, 3, 2, 8, 64)
    calls = []
    real = DiskStore._verify_in_place
    monkeypatch.setattr(DiskStore, "_verify_in_place", lambda self, *a: calls.append(1) or real(self, *a))
    with DiskStore(cfg) as s:
        s.write_groups("a", 0, 0, kv)
        info = open_segment(files(cfg)[0], cfg)
        assert info.data_offset % 4096 == 0
        r = s.read_groups("a", 0, range(4, 20))
        assert r.found.all() and torch.equal(r.kv, kv[4:20])
        assert (len(calls) > 0) == s.stats.direct_io
        with open(info.path, "r+b") as f:  # damage group 6: detected in place, not served
            f.seek(info.data_offset + 6 * info.row_bytes + 5)
            f.write(b"\x00\x01\x02")
        r = s.read_groups("a", 0, range(4, 20))
        assert r.found.tolist() == [True, True, False] + [True] * 13
        assert s.stats.checksum_failures == 1
        r = s.read_groups("a", 0, [9, 9, 3])  # duplicates and reversed order: the copy path
        assert r.found.all() and torch.equal(r.kv, kv[[9, 9, 3]])


def test_encryption_key_from_env(monkeypatch) -> None:
    from kvswap_vllm.store.crypto import KEY_ENV, key_from_env

    monkeypatch.delenv(KEY_ENV, raising=False)
    assert key_from_env() is None
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    assert key_from_env() == KEY
    for bad in ("zz" * 32, "ab" * 16):
        monkeypatch.setenv(KEY_ENV, bad)
        with pytest.raises(StoreError, match="64 hex digits"):
            key_from_env()
