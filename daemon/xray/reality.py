"""REALITY's secrets: X25519 key pairs and short ids, encoded as `xray x25519` prints them.

Pure computation (the randomness comes from `secrets`): base64url without padding in and out,
ValueError for a key that is not 32 bytes.
"""

from __future__ import annotations

import base64
import re
import secrets

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from daemon.xray.model import Reality


def generate_reality() -> Reality:
    """A fresh X25519 pair; the private key clamped as `xray x25519` does (same public key)."""
    return reality_from_private(_b64url(_clamp(secrets.token_bytes(32))))


def reality_from_private(private_key: str) -> Reality:
    return Reality(private_key=private_key, public_key=public_key(private_key))


def public_key(private_key: str) -> str:
    """The public half of a base64url X25519 private key, encoded the same way."""
    raw = decode_key(private_key)
    public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return _b64url(public)


def decode_key(text: str) -> bytes:
    """32 key bytes from base64url (padding optional); ValueError otherwise."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]{43}=?", text):
        raise ValueError("an X25519 key must be 32 bytes in base64url (43 characters)")
    return base64.urlsafe_b64decode(text.rstrip("=") + "=")


def new_short_id(length: int = 16) -> str:
    """A random REALITY short id: `length` hex digits (even, 2-16)."""
    if length % 2 or not 2 <= length <= 16:
        raise ValueError("a short id has an even number of hex digits, 2 to 16")
    return secrets.token_hex(length // 2)


def _clamp(raw: bytes) -> bytes:
    key = bytearray(raw)
    key[0] &= 248
    key[31] &= 127
    key[31] |= 64
    return bytes(key)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
