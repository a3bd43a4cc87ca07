"""The benchmark harness itself: its systems are valid connector configurations, bad names are
refused, and results are plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import throughput, throughput_plot
from kvswap_vllm.vllm.connector_config import ConnectorConfig


@pytest.mark.parametrize("system", list(throughput.SYSTEMS))
def test_every_system_is_a_valid_connector_configuration(system: str) -> None:
    cfg = ConnectorConfig.from_extra_config({"kv_dir": "/tmp/x", "budget_tokens": 400, **throughput.SYSTEMS[system]})
    assert cfg.sparse  # every system but stock vLLM runs KVSwap's runtime


def test_unknown_system_is_refused_with_the_known_ones(capsys) -> None:
    with pytest.raises(SystemExit):
        throughput.main(["--systems", "vllm-full,flexgen"])
    err = capsys.readouterr().err
    assert "unknown system(s) flexgen" in err and "dense-disk" in err


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [{"system": s, "context": c, "batch": b, "tokens_per_s": t, "kv_memory_mb": m}
            for s, c, b, t, m in [("vllm-full", 4000, 4, 28.9, 708), ("kvswap", 4000, 4, 11.2, 134),
                                  ("kvswap", 7000, 8, 5.0, 360)]]  # a missing (system, case) is drawn as 0
    src = tmp_path / "t.json"
    src.write_text(json.dumps({"rows": rows, "budget_tokens": 400, "max_new_tokens": 16}))
    assert throughput_plot.main([str(src)]) == 0
    png = src.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
