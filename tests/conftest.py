"""Shared fixtures: the prepared default model."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvswap_vllm.models.prepare import default_model_path


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model prepared by `make model`; its absence is a failure, not a skip."""
    path = default_model_path()
    if not (path / "config.json").is_file():
        pytest.fail(f"default model not prepared at {path}: run `make model` (make test does it)")
    return path
