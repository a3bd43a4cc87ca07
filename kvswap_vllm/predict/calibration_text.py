"""Default calibration text, available offline everywhere: the docstrings of Python's own
standard library (English prose about programming), read with `ast` in sorted file order."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

SOURCE = "docstrings of the Python standard library (Lib/*.py, sorted)"


def stdlib_docstrings(max_chars: int = 400_000) -> str:
    """Up to `max_chars` characters of module/class/function docstrings, deterministic for a
    given Python version."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
                    total += len(doc) + 2
                    if total >= max_chars:
                        return "\n\n".join(parts)[:max_chars]
    return "\n\n".join(parts)
