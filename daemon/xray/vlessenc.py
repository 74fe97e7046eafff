"""VLESS Encryption: the client half of a VLESS inbound's `decryption`, for share links.

An inbound takes `"decryption": "none"` or
`mlkem768x25519plus.<mode>.<ttl>.[<padding>.…]<key>[.<key>…]`; its clients take
`mlkem768x25519plus.<mode>.<0rtt|1rtt>.<key>[.<key>…]` as `encryption`, each key the public half
of the server's, in the same order: a 32-byte X25519 private key gives its public key, a 64-byte
ML-KEM-768 seed its 1,184-byte encapsulation key (the pairs `xray vlessenc` prints). Pure: a
string in, the client's string out, or ValueError in the words Xray refuses the setting with
(its VLESS inbound builder, infra/conf/vless.go).
"""

from __future__ import annotations

import base64
import functools
import re

from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KIND = "mlkem768x25519plus"
MODES = ("native", "xorpub", "random")
TTL = re.compile(r"\d+(?:-\d+)?s?\Z")  # "600s", "600", "300-600s", "0s"
PADDING = re.compile(r"\d+-\d+-\d+\Z")  # len-min-max
BASE64URL = re.compile(r"[A-Za-z0-9_-]+\Z")
KEY_TOKEN = 20  # Xray reads a shorter part as padding, a longer one as a key
MISSING = 'VLESS settings: please add/set "decryption":"none" to every settings'


def client_encryption(decryption: object) -> str:
    """The `encryption` a client of an inbound with this `decryption` uses ("none" for none).

    The ticket lifetime becomes `0rtt` (a client uses a ticket only when the server offers one)
    and the server's padding is left out (each side pads what it sends; none means Xray's
    defaults)."""
    if not isinstance(decryption, str) or not decryption:
        raise ValueError(MISSING)
    return _client_encryption(decryption)


@functools.lru_cache(maxsize=1024)
def _client_encryption(decryption: str) -> str:
    """client_encryption of a string: derived once per setting, not once per link."""
    if decryption == "none":
        return "none"
    unsupported = ValueError(f'VLESS settings: unsupported "decryption": {decryption}')
    parts = decryption.split(".")
    if len(parts) < 4 or parts[0] != KIND or parts[1] not in MODES or not TTL.match(parts[2]):
        raise unsupported
    keys = []
    for part in parts[3:]:
        if len(part) < KEY_TOKEN:
            if not PADDING.match(part):
                raise unsupported
            continue
        keys.append(_public_half(part, unsupported))
    if not keys:
        raise unsupported
    return ".".join([KIND, parts[1], "0rtt", *keys])


def _public_half(token: str, unsupported: ValueError) -> str:
    """The client's key for one server key (base64url without padding, as Xray writes them)."""
    if not BASE64URL.match(token):
        raise unsupported
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    if len(raw) == 32:
        public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    elif len(raw) == 64:
        key = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw).public_key()
        public = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    else:
        raise unsupported
    return base64.urlsafe_b64encode(public).rstrip(b"=").decode()
