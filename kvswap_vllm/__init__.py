"""KVSwap for vLLM: the KV cache on disk, read back only what each decode step needs."""

__version__ = "0.1.0"
