"""The selection's per-sequence arithmetic in C (scoring.c beside this file), built on first use
with the machine's C compiler and loaded through ctypes; torch does the same work where no
compiler is found (`available()` False, one warning).

Why: after the int8 product, scoring a layer of one sequence was about ten torch operations over
(heads, tokens) arrays (scales, softmax, two maxima, a log, two sums) and its rest estimate about
fifteen more over the selected tokens; at 7k tokens each costs a few microseconds of dispatch
plus a pass over memory. Measured on the dev VM, one 7k-token layer with 9 heads: scoring
56 -> 19 us, the rest estimate 45 -> 6 us (tests/test_native.py checks both against torch).

The library is cached under <kvswap home>/native, keyed by the source, the compiler, its flags
and the CPU's feature flags (it is built for this CPU: -march=native), and written atomically,
so processes that build it at once never load a partial file. KVSWAP_NATIVE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kvswap_vllm.paths import kvswap_home

log = logging.getLogger("kvswap")

SOURCE = Path(__file__).with_name("scoring.c")
#: Vectorising the loops' float reductions needs them reassociated (-fassociative-math and what it
#: requires) and finite math; nothing else of fast-math (errno, denormals) is asked for.
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-ffinite-math-only")
#: Environment variable: 0 keeps the torch path (A/B runs, a suspected miscompilation).
ENV = "KVSWAP_NATIVE"

_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "kvswap_softmax_groups": (_I, _I, _I) + (_P,) * 7,
    "kvswap_rest": (_I, _I, _I, _I, _P, _P, _I64, _P, _I, _P, _P, _F, _P, _P, _P),
    "kvswap_top_groups": (_I, _I, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P),
}
_RETURNS_STATUS = ("kvswap_rest", "kvswap_top_groups")
_lock = threading.Lock()
_local = threading.local()
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *CFLAGS, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    folder = kvswap_home() / "native"
    lib = folder / f"scoring-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".scoring-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV, "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("kvswap: no C compiler found (cc, gcc, clang or $CC), so selection runs its arithmetic in "
                    "torch, slower; install one (e.g. build-essential) to speed it up")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("kvswap: could not build the selection's C kernels (%s); selection runs in torch, slower", exc)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _I if name in _RETURNS_STATUS else None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built the first time; None where they cannot be (see the module)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib, _tried = _load(), True
    return _lib


def available() -> bool:
    return library() is not None


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"the C kernels take contiguous host tensors, got {tuple(t.shape)} strides {t.stride()} "
                             f"on {t.device}")


def softmax_groups(prod: torch.Tensor, qscale: torch.Tensor, kscale: torch.Tensor, group_size: int,
                   probs: torch.Tensor, lse: torch.Tensor, group_mass: torch.Tensor, token_mass: torch.Tensor) -> None:
    """From int8 products prod (heads, tokens) int32 and scales qscale (heads,) and kscale
    (tokens,): probs (heads, tokens) = per head the softmax of the logits prod * qscale * kscale,
    lse (heads,) their log-sum-exp, group_mass (tokens / group_size,) each group's probability
    summed over heads; token_mass (tokens,) is scratch. Outputs float32, written in place."""
    heads, tokens = prod.shape
    _check(prod, qscale, kscale, probs, lse, group_mass, token_mass)
    if prod.dtype != torch.int32 or tokens % group_size or group_mass.numel() != tokens // group_size or \
            probs.shape != prod.shape or qscale.numel() != heads or kscale.numel() != tokens or \
            token_mass.numel() < tokens or lse.numel() != heads:
        raise ValueError("softmax_groups: shapes or dtypes do not match")
    library().kvswap_softmax_groups(heads, tokens, group_size, prod.data_ptr(), qscale.data_ptr(), kscale.data_ptr(),
                                    probs.data_ptr(), lse.data_ptr(), group_mass.data_ptr(), token_mass.data_ptr())


def rest(probs: torch.Tensor, values: torch.Tensor, group_size: int, groups: torch.Tensor, out_all: torch.Tensor,
         lse: torch.Tensor, min_mass: float, out: torch.Tensor, rest_lse: torch.Tensor,
         scratch: torch.Tensor) -> None:
    """What a selection of `groups` (ascending int64 ids) leaves out, as one softmax block per head
    (see HeadwiseLowRank._estimate_rest, whose torch form it replaces): out (heads, rv) its output
    in the low-rank value space, rest_lse (heads,) its log-sum-exp (-inf: nothing left, mass below
    min_mass). probs (heads, tokens) and lse as softmax_groups gave them; values (rv, tokens), rows
    contiguous (a view of columns); out_all (heads, rv) = probs @ values.T; scratch: (heads + rv)
    * len(groups) * group_size floats at least."""
    heads, tokens = probs.shape
    rv = values.shape[0]
    _check(probs, groups, out_all, lse, out, rest_lse, scratch)
    if values.shape[1] != tokens or values.stride(1) != 1 or groups.dtype != torch.int64 or \
            out.shape != (heads, rv) or out_all.shape != (heads, rv) or \
            scratch.numel() < (heads + rv) * groups.numel() * group_size:
        raise ValueError("rest: shapes or dtypes do not match")
    if library().kvswap_rest(heads, tokens, group_size, rv, probs.data_ptr(), values.data_ptr(), values.stride(0),
                          groups.data_ptr(), groups.numel(), out_all.data_ptr(), lse.data_ptr(), min_mass,
                          scratch.data_ptr(), out.data_ptr(), rest_lse.data_ptr()):
        raise ValueError(f"rest: group ids outside the {tokens // group_size} groups scored")


def scratch(name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per thread and name, a reused buffer of at least `numel` elements (the kernels' scratch)."""
    buf = _local.__dict__.get(name)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=dtype)
        setattr(_local, name, buf)
    return buf


def top_groups(scores: torch.Tensor, counts: list[int], k: int, previous: list[torch.Tensor | None],
               places: int) -> torch.Tensor:
    """predict.base.top_groups in one call: (rows, k) int64 ids, ascending, of the k best groups
    of each row of `scores` (rows, groups) float32, of which the first counts[row] (>= k) are
    that row's groups; those of `previous[row]` (int64 ids) rank `places` places higher. Ties go
    to the lower id."""
    rows, n = scores.shape
    _check(scores)
    if scores.dtype != torch.float32 or len(counts) != rows or len(previous) != rows:
        raise ValueError("top_groups: shapes or dtypes do not match")
    prev = [None if p is None or not p.numel() else p.to(torch.int64).contiguous() for p in previous]
    out = torch.empty(rows, k, dtype=torch.int64)
    status = library().kvswap_top_groups(
        rows, n, scores.data_ptr(), (_I64 * rows)(*counts), k, places,
        (_P * rows)(*[None if p is None else p.data_ptr() for p in prev]),
        (_I64 * rows)(*[0 if p is None else p.numel() for p in prev]), out.data_ptr(),
        scratch("cand", n, torch.int64).data_ptr(), scratch("key", k + places, torch.float64).data_ptr(),
        scratch("flag", n, torch.uint8).data_ptr())
    if status:
        raise ValueError(f"top_groups: a row has fewer than {k} groups or more than its {n} columns")
    return out
