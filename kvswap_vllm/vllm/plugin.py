"""vLLM plugin (entry point group `vllm.general_plugins`), loaded in every vLLM process.

It registers the connector name `kvswap` and adds the `--kv-connector NAME` flag to vLLM's
engine arguments, so that `vllm serve MODEL --kv-connector kvswap` means
`--kv-transfer-config '{"kv_connector": "kvswap", "kv_role": "kv_both"}'`. Both are safe when
the plugin is loaded more than once.
"""

from __future__ import annotations

import argparse
import json
import logging

from kvswap_vllm.vllm.connector_config import CONNECTOR_NAME

log = logging.getLogger("vllm.kvswap")  # under "vllm" so that vLLM's log handlers print it
CONNECTOR_MODULE = "kvswap_vllm.vllm.connector"
CONNECTOR_CLASS = "KVSwapConnector"
# Spelled out in errors when this vLLM release no longer accepts the flag.
SUPPORTED_SPELLING = ("--kv-transfer-config '{\"kv_connector\":\"kvswap\",\"kv_role\":\"kv_both\"}' "
                      "(or --kv-transfer-config.kv_connector kvswap --kv-transfer-config.kv_role kv_both)")


def register() -> None:
    register_connector()
    add_kv_connector_flag()
    register_cpu_attention()


def register_cpu_attention() -> None:
    """On the CPU platform, CPU_ATTN becomes our subclass: plain vLLM unless the kvswap
    connector runs KVSwap decoding (see sparse_attention.py)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    path = "kvswap_vllm.vllm.sparse_attention.KVSwapCPUAttentionBackend"
    if AttentionBackendEnum.CPU_ATTN.get_path() != path:
        register_backend(AttentionBackendEnum.CPU_ATTN, path)


def register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:  # register_connector raises on a second call
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)


def transfer_config_json(name: str, extra: dict | None = None) -> str:
    """The --kv-transfer-config value that `--kv-connector NAME` stands for."""
    cfg: dict = {"kv_connector": name, "kv_role": "kv_both"}
    if extra:
        cfg["kv_connector_extra_config"] = extra
    return json.dumps(cfg)


def add_kv_connector_flag() -> None:
    """Wrap EngineArgs.add_cli_args so every vLLM parser gets `--kv-connector`."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args  # a staticmethod: plain function on the class
    if getattr(original, "_kvswap_flag", False):
        return

    def add_cli_args(parser, *args, **kwargs):  # noqa: ANN001, ANN202 (vLLM's signature)
        parser = original(parser, *args, **kwargs)
        install_flag(parser)
        return parser

    add_cli_args._kvswap_flag = True  # type: ignore[attr-defined]
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]


def install_flag(parser: argparse.ArgumentParser) -> None:
    """Add --kv-connector; if this vLLM's parser does not allow it, the flag still exists but
    fails with a message naming the spelling that works."""
    try:
        _add_flag(parser)
    except Exception as exc:  # an argparse or config change in a later vLLM
        log.warning("kvswap: could not add --kv-connector to vLLM's arguments (%s); use %s", exc, SUPPORTED_SPELLING)
        if not any("--kv-connector" in a.option_strings for a in parser._actions):
            parser.add_argument("--kv-connector", type=_unsupported(exc), help=argparse.SUPPRESS)


def _unsupported(exc: Exception):  # noqa: ANN202
    def fail(_: str) -> None:
        raise argparse.ArgumentTypeError(
            f"this vLLM release does not accept --kv-connector ({exc}); use {SUPPORTED_SPELLING}")
    return fail


def _add_flag(parser: argparse.ArgumentParser) -> None:
    if any("--kv-connector" in a.option_strings for a in parser._actions):
        return
    dest = next((a.dest for a in parser._actions if "--kv-transfer-config" in a.option_strings), None)
    if dest is None:
        raise RuntimeError("vLLM has no --kv-transfer-config argument")
    convert = next(a.type for a in parser._actions if "--kv-transfer-config" in a.option_strings)
    parser.add_argument(
        "--kv-connector", dest=dest, metavar="NAME",
        type=lambda name: convert(transfer_config_json(name)) if convert else transfer_config_json(name),
        help="Shorthand for --kv-transfer-config '{\"kv_connector\": NAME, \"kv_role\": \"kv_both\"}' "
             "(added by kvswap_vllm). Options go in --kv-transfer-config.kv_connector_extra_config.",
    )
