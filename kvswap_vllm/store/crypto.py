"""Optional encryption at rest: AES-256-GCM per group (nonce || ciphertext || tag)."""

from __future__ import annotations

import os

from kvswap_vllm.store.errors import StoreError

NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
KEY_ENV = "KVSWAP_ENCRYPTION_KEY"


class GroupCipher:
    """Seals and opens single groups; the group's identity is bound as associated data, so a
    group copied to another place (file, layer, index) fails to open."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def seal(self, plaintext: memoryview, identity: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, bytes(plaintext), identity)

    def open(self, sealed: memoryview, identity: bytes) -> bytes | None:
        """The plaintext, or None if the bytes were altered or belong elsewhere."""
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(bytes(sealed[:NONCE_BYTES]), bytes(sealed[NONCE_BYTES:]), identity)
        except InvalidTag:
            return None


def key_from_env() -> bytes | None:
    """A 32-byte key from $KVSWAP_ENCRYPTION_KEY (64 hex digits), or None when unset."""
    text = os.environ.get(KEY_ENV)
    if not text:
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise StoreError(f"{KEY_ENV} must be 64 hex digits (a 32-byte AES-256 key)") from exc
    if len(key) != 32:
        raise StoreError(f"{KEY_ENV} must be 64 hex digits (a 32-byte AES-256 key), got {len(key)} bytes")
    return key
