"""The vLLM-facing side of kvswap: thin, pinned to the vLLM release in pyproject.toml."""
