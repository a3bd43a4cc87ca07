"""Benchmarks: each writes its result as JSON (and some a PNG beside it)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(result: dict, out: Path | None) -> str:
    """The result as indented JSON, written to `out` (folders created) when given."""
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text
