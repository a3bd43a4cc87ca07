"""`kvswap store inspect|probe` and the store benchmark, on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from kvswap_vllm.store import DiskStore
from kvswap_vllm.store.format import open_segment
from tests.helpers import REPO, run_kvswap
from tests.test_store import groups, make_cfg


def _populate(root: Path) -> list[Path]:
    cfg = make_cfg(root)
    with DiskStore(cfg) as s:
        s.open_sequence("a", private=False)
        for layer in range(3):
            s.write_groups("a", layer, 0, groups(8))
    return sorted(cfg.namespace.rglob("*.arrow"))


def test_inspect_reports_ok_corrupt_and_foreign_files(tmp_path: Path) -> None:
    files = _populate(tmp_path / "kv")
    info = open_segment(files[1], make_cfg(tmp_path / "kv"))
    with open(files[1], "r+b") as f:  # damage one group of layer 1
        f.seek(info.data_offset + 3 * info.row_bytes)
        f.write(b"\xff" * 8)
    table = pa.ipc.open_file(str(files[2])).read_all()
    meta = {**table.schema.metadata, b"kvswap.format_version": b"7"}
    with pa.ipc.new_file(str(files[2]), table.schema.with_metadata(meta)) as w:
        w.write_table(table.replace_schema_metadata(meta))
    res = run_kvswap("store", "inspect", str(tmp_path / "kv"), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    status = [f["status"] for f in out["files"]]
    assert status[0] == "ok"
    assert status[1] == "1/8 groups fail their checksum"
    assert "format version 7" in status[2]
    assert out["files"][0]["tenant"] == "default" and out["files"][0]["groups"] == 8
    assert out["summary"].startswith("3 block files") and out["summary"].endswith("2 with problems")
    text = run_kvswap("store", "inspect", str(tmp_path / "kv")).stdout
    assert "L000-G0000000000.arrow" in text and "2 with problems" in text


def test_inspect_missing_folder(tmp_path: Path) -> None:
    res = run_kvswap("store", "inspect", str(tmp_path / "nope"))
    assert res.returncode == 2 and "not a folder" in res.stderr


def test_probe_writes_a_usable_profile(tmp_path: Path) -> None:
    out = tmp_path / "prof.json"
    res = run_kvswap("store", "probe", "--dir", str(tmp_path / "dev"), "--size-mb", "8",
                     "--seconds-per-cell", "0.01", "--out", str(out))
    assert res.returncode == 0, res.stderr
    prof = json.loads(out.read_text())
    assert prof["read_mb_s"] > 0 and prof["queue_depth"] in (1, 2, 4, 8, 16, 32)
    assert 4096 <= prof["best_request_bytes"] <= 1 << 20
    matrix = json.loads(out.with_suffix(".matrix.json").read_text())
    assert len(matrix) == 9 * 6
    assert not list((tmp_path / "dev").iterdir())  # scratch file removed
    from kvswap_vllm.store.profiles import get_profile

    assert get_profile(str(out)).read_mb_s == prof["read_mb_s"]


def test_store_bench_runs_and_reports_goals(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.store_bench", "--out", str(out), "--dir", str(tmp_path),
         "--group-kib", "16", "--data-mb", "16", "--passes", "1", "--read-gb", "0.05"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("read_ratio_vs_raw", "write_ratio_vs_raw", "page_cache_growth_mb", "rss_growth_mb"):
        assert isinstance(result[key], (int, float))
    assert result["rows"][0]["group_kib"] == 16 and result["memory"]["checksum_failures"] == 0
    assert out.with_suffix(".png").stat().st_size > 1000
