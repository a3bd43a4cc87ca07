"""Where kvswap keeps its files: one root, overridable by environment variable."""

from __future__ import annotations

import os
from pathlib import Path

#: Root of everything kvswap writes (models, KV tiers, adapters).
HOME_ENV = "KVSWAP_HOME"
#: Overrides only the folder of prepared models.
MODELS_ENV = "KVSWAP_MODELS_DIR"


def kvswap_home() -> Path:
    """The root folder: $KVSWAP_HOME, else $XDG_CACHE_HOME/kvswap, else ~/.cache/kvswap."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvswap"


def models_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Folder of prepared models: the flag, else $KVSWAP_MODELS_DIR, else <home>/models."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    return kvswap_home() / "models"


def kv_dir() -> Path:
    """Default root of the disk tier: <home>/kv."""
    return kvswap_home() / "kv"


def profiles_dir() -> Path:
    """Where `kvswap store probe` writes measured storage profiles."""
    return kvswap_home() / "profiles"
