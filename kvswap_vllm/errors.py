"""Exceptions that carry a message meant for the user (the CLI prints them on one line)."""

from __future__ import annotations


class KVSwapError(Exception):
    """A problem the user can fix: bad input, bad configuration, a full or unwritable disk."""

    exit_code = 2


class ModelPrepareError(KVSwapError):
    """The model could not be converted or verified; nothing was left half-written."""
