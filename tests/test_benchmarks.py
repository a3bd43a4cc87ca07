"""The benchmark harness itself: its systems are valid connector configurations, bad names are
refused, and results are plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import throughput, throughput_plot
from kvswap_vllm.store.profiles import PROFILES
from kvswap_vllm.vllm.connector_config import ConnectorConfig


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A checkpoint folder as far as the harness looks (config.json): SmolLM2-135M's shape."""
    cfg = {"num_hidden_layers": 30, "num_key_value_heads": 3, "num_attention_heads": 9, "hidden_size": 576}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("profile", [throughput.NATIVE, *PROFILES])
@pytest.mark.parametrize("system", list(throughput.SYSTEMS))
def test_every_system_is_a_valid_connector_configuration(system: str, profile: str, model_dir: Path) -> None:
    options = throughput.system_options(system, profile, model_dir, 400)
    cfg = ConnectorConfig.from_extra_config({"kv_dir": "/tmp/x", "budget_tokens": 400, **options})
    assert cfg.sparse  # every system but stock vLLM runs KVSwap's runtime
    # a profile throttles the reads to its device and picks G, unless the system fixes G
    assert cfg.throttle_reads == (profile != throughput.NATIVE)
    assert cfg.storage_profile == ("nvme" if profile == throughput.NATIVE else profile)
    if system == "infinigen":
        assert cfg.group_size == 1
    elif profile != throughput.NATIVE:
        assert cfg.group_size == PROFILES[profile].group_size(3 * 64 * 2 * 4, 400)
    ram = ConnectorConfig.from_extra_config({"kv_dir": "/dev/shm/x", **throughput.compute_only_options(options)})
    assert not ram.throttle_reads and ram.direct_io == "off" and ram.group_size == cfg.group_size


@pytest.mark.parametrize("profile", [throughput.NATIVE, "emmc"])
def test_group_size_option_sets_g_of_the_systems_that_do_not_fix_it(profile: str, model_dir: Path) -> None:
    assert throughput.system_options("kvswap", profile, model_dir, 400, group_size=8)["group_size"] == 8
    assert throughput.system_options("infinigen", profile, model_dir, 400, group_size=8)["group_size"] == 1


def test_stock_vllm_has_no_connector_options(model_dir: Path) -> None:
    assert throughput.system_options("vllm-full", "emmc", model_dir, 400) is None


@pytest.mark.parametrize("flags, needle", [
    (["--systems", "vllm-full,flexgen"], "unknown system(s) flexgen"),
    (["--profiles", "native,floppy"], "unknown profile(s) floppy"),
])
def test_unknown_names_are_refused_with_the_known_ones(capsys, flags: list[str], needle: str) -> None:
    with pytest.raises(SystemExit):
        throughput.main(flags)
    err = capsys.readouterr().err
    assert needle in err and ("dense-disk" in err if "system" in needle else "emmc" in err)


def test_budget_sweep_runs_stock_systems_once() -> None:
    cases = throughput.plan_cases([4000], [1, 4], ["native", "emmc"], ["vllm-full", "kvswap"], [200, 800])
    assert [c for c in cases if c[3] == "vllm-full"] == [(4000, 1, "native", "vllm-full", 200),
                                                         (4000, 4, "native", "vllm-full", 200)]
    kv = [c for c in cases if c[3] == "kvswap"]
    assert len(kv) == 2 * 2 * 2 and {(c[2], c[4]) for c in kv} == {(p, m) for p in ("native", "emmc") for m in (200, 800)}


@pytest.mark.parametrize("value", ["400,x", "0", "-5,400"])
def test_bad_budget_lists_are_refused(capsys, value: str) -> None:
    with pytest.raises(SystemExit):
        throughput.main(["--budget-tokens", value])
    assert "--budget-tokens" in capsys.readouterr().err


def test_plot_of_a_budget_sweep(tmp_path: Path) -> None:
    rows = [{"system": "vllm-full", "context": 4000, "batch": 4, "tokens_per_s": 28.9, "kv_memory_mb": 708,
             "budget_tokens": None}]
    rows += [{"system": "kvswap", "context": 4000, "batch": 4, "tokens_per_s": 8 - m / 200, "kv_memory_mb": m / 3,
              "budget_tokens": m} for m in (200, 400, 800)]
    src = tmp_path / "sweep.json"
    src.write_text(json.dumps({"rows": rows, "engine": "vllm", "budget_tokens": [200, 400, 800], "max_new_tokens": 16}))
    assert throughput_plot.main([str(src)]) == 0
    assert src.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [{"system": s, "context": c, "batch": b, "tokens_per_s": t, "kv_memory_mb": m}
            for s, c, b, t, m in [("vllm-full", 4000, 4, 28.9, 708), ("kvswap", 4000, 4, 11.2, 134),
                                  ("kvswap", 7000, 8, 5.0, 360)]]
    rows.append({"system": "kvswap", "context": 4000, "batch": 4, "profile": "emmc", "tokens_per_s": 6.0,
                 "kv_memory_mb": 134})  # another profile: a case of its own, stock's bar repeated  # a missing (system, case) is drawn as 0
    src = tmp_path / "t.json"
    src.write_text(json.dumps({"rows": rows, "budget_tokens": 400, "max_new_tokens": 16}))
    assert throughput_plot.main([str(src)]) == 0
    png = src.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_kvswap_bench_runs_a_benchmark_of_the_checkout(tmp_path: Path) -> None:
    import subprocess
    import sys

    from kvswap_vllm.cli import bench_command
    from kvswap_vllm.errors import KVSwapError
    from tests.helpers import REPO

    assert bench_command(["--batch", "4"], REPO)[1:] == ["-m", "benchmarks.throughput", "--batch", "4"]
    assert bench_command(["store", "--out", "x.json"], REPO)[1:] == ["-m", "benchmarks.store_bench", "--out", "x.json"]
    with pytest.raises(KVSwapError, match="unknown benchmark 'speed'; one of throughput"):
        bench_command(["speed"], REPO)
    with pytest.raises(KVSwapError, match="source checkout"):
        bench_command(["throughput"], tmp_path)  # an install without benchmarks/
    # The real command: arguments reach the benchmark (its own validation answers).
    proc = subprocess.run([sys.executable, "-m", "kvswap_vllm.cli", "bench", "throughput", "--profiles", "floppy"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown profile(s) floppy" in proc.stderr


def test_hf_engine_systems_are_checked(capsys) -> None:
    with pytest.raises(SystemExit):
        throughput.main(["--engine", "hf", "--systems", "hf-full,kvswap-noreuse"])
    err = capsys.readouterr().err
    known = ", ".join((*throughput.HF_SYSTEMS, throughput.LLAMACPP))
    assert f"unknown system(s) kvswap-noreuse for --engine hf; known: {known}" in err
    assert "kvswap-noreuse" not in throughput.HF_SYSTEMS


def test_device_is_for_the_hf_engine(capsys) -> None:
    with pytest.raises(SystemExit):
        throughput.main(["--engine", "vllm", "--device", "cuda"])
    assert "--device is for --engine hf" in capsys.readouterr().err


def test_random_model_like_a_checkpoint(tmp_path: Path, default_model: Path) -> None:
    """`tiny_model --like`: the checkpoint's shape and tokenizer, random weights, loadable."""
    from transformers import AutoConfig, AutoTokenizer

    from benchmarks.tiny_model import main as tiny_main
    from tests.helpers import write_tiny_llama

    src = write_tiny_llama(tmp_path / "src", default_model, heads=2, kv_heads=1, layers=3)
    assert tiny_main([str(tmp_path / "like"), "--like", str(src), "--max-positions", "9000"]) == 0
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "like")
    assert (b.num_hidden_layers, b.num_key_value_heads, b.hidden_size) == (3, 1, 64)
    assert b.max_position_embeddings == 9000 != a.max_position_embeddings
    assert AutoTokenizer.from_pretrained(tmp_path / "like")("hello").input_ids


def test_llamacpp_is_a_system_of_every_engine(capsys) -> None:
    for engine in ("vllm", "hf"):
        with pytest.raises(SystemExit):
            throughput.main(["--engine", engine, "--systems", "llamacpp,nope"])
        assert "unknown system(s) nope" in capsys.readouterr().err  # llamacpp itself is known


@pytest.mark.slow
def test_llamacpp_row_on_the_default_models_gguf(tmp_path: Path, default_model: Path) -> None:
    """The llama.cpp baseline runs the GGUF the default model was prepared from, greedy, and
    finds the pass keys the other engines find."""
    row = throughput.run_row(default_model, "llamacpp", 600, 2, 20, 400, tmp_path, gguf=throughput.model_gguf(default_model))
    assert row["engine"] == "llamacpp" and 0 < row["decode_steps_measured"] <= 2 * 19  # EOS may end one early
    assert row["tokens_per_s"] > 0 and row["passkeys_correct"] == 2
    n_ctx = max(600, row["context"])  # n_ctx >= the longest prompt + new tokens
    assert row["kv_memory_mb"] * 2**20 >= n_ctx * 30 * 3 * 64 * 2 * 2
    assert row["weights_mb"] < 200  # the quantised GGUF, not the fp32 checkpoint


@pytest.mark.parametrize("value", ["0", "500"])
def test_bad_group_size_is_refused(capsys, value: str) -> None:
    with pytest.raises(SystemExit):
        throughput.main(["--group-size", value, "--budget-tokens", "400"])
    assert "--group-size must be between 1 and the smallest budget" in capsys.readouterr().err


def test_decode_reads_measures_every_engine_and_thread_count_on_real_files(tmp_path: Path) -> None:
    from benchmarks import decode_reads
    from kvswap_vllm.store import aio
    from kvswap_vllm.store.fileio import direct_io_supported

    out = tmp_path / "reads.json"
    assert decode_reads.main(["--out", str(out), "--threads", "1,3", "--loads", "5", "--context", "800",
                              "--batch", "2", "--dir", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())["rows"]
    expected = ([("aio", None)] if aio.available() and direct_io_supported(tmp_path) else []) + \
        [("threads", 1), ("threads", 3)]
    assert [(r["engine"], r["threads"]) for r in rows] == expected
    assert all(r["groups_per_load"] == 32 and r["sequences"] == 2 and r["wall_ms_per_load"] > 0
               and r["cpu_us_per_group"] > 0 for r in rows)


@pytest.mark.parametrize("flags", [["--threads", "0"], ["--groups", "999"], ["--loads", "0"], ["--batch", "0"]])
def test_decode_reads_refuses_bad_settings(tmp_path: Path, capsys, flags: list[str]) -> None:
    from benchmarks import decode_reads

    with pytest.raises(SystemExit):
        decode_reads.main(["--out", str(tmp_path / "x.json"), "--context", "800", *flags])
    assert "need threads >= 1" in capsys.readouterr().err


def test_decode_replay_times_every_part_with_and_without_kernel_aio(tmp_path: Path, default_model: Path) -> None:
    from benchmarks import decode_replay

    out = tmp_path / "replay.json"
    assert decode_replay.main(["--out", str(out), "--batch", "2", "--context", "600", "--steps", "2",
                               "--parts", "1", "2", "--dir", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel_aio"] for r in rows][2:] == [False]  # the first two use AIO where the machine has it
    assert [r["parts"] for r in rows] == [1, 2, 1]
    for r in rows:
        assert r["step_s"] > 0 and r["groups_read_per_layer_per_sequence"] > 0
        assert set(r["parts_s_per_step"]) == {"selection", "reads", "hot-tier bookkeeping", "gather, tail, attention"}
        assert sum(r["parts_s_per_step"].values()) <= r["step_s"] * 1.5  # parts do not overlap


def test_repeats_take_turns_and_rows_report_the_median_run(tmp_path: Path, monkeypatch) -> None:
    """--repeats N: the cases run in turns (a, b, a, b, ...), each row holds its median run's
    figures and every run's step time."""
    calls: list[str] = []
    times = {"vllm-full": iter([0.5, 0.3, 0.4]), "kvswap": iter([0.2, 0.6, 0.35])}

    def fake_row(model, system, *args, **kwargs) -> dict:
        calls.append(system)
        step = next(times[system])
        return {"system": system, "context": 1000, "batch": 1, "step_s": step, "tokens_per_s": 1 / step}

    monkeypatch.setattr(throughput, "run_row", fake_row)
    monkeypatch.setattr(throughput, "plot", lambda *a: None)
    out = tmp_path / "t.json"
    assert throughput.main(["--systems", "vllm-full,kvswap", "--batch", "1", "--context", "1000", "--repeats", "3",
                            "--model", str(tmp_path), "--out", str(out)]) == 0
    assert calls == ["vllm-full", "kvswap"] * 3
    rows = json.loads(out.read_text())["rows"]
    assert [(r["system"], r["step_s"], r["runs_step_s"]) for r in rows] == [
        ("vllm-full", 0.4, [0.5, 0.3, 0.4]), ("kvswap", 0.35, [0.2, 0.6, 0.35])]
    assert throughput.median_run([{"step_s": 0.3}, {"step_s": 0.1}]) == {"step_s": 0.1, "runs_step_s": [0.3, 0.1]}
    with pytest.raises(SystemExit):
        throughput.main(["--repeats", "0"])
