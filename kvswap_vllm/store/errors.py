"""Errors of the disk tier; all are KVSwapError, so the CLI prints them on one line."""

from kvswap_vllm.errors import KVSwapError


class StoreError(KVSwapError):
    """The store cannot be used as configured (bad folder, permissions, config)."""


class FormatError(StoreError):
    """A block file is not ours, is of an unknown version, or is damaged."""


class ModelMismatchError(FormatError):
    """A block file belongs to another model, dtype or layout than the store's."""


class DamagedFileError(FormatError):
    """A block file is truncated or its structure is broken; safe to delete."""


class ShortReadError(DamagedFileError):
    """The file ended before the bytes its index promised (truncated)."""


class MissingGroupsError(StoreError):
    """Groups a caller relies on are not (or no longer) in the disk tier."""
