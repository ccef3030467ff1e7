"""DKIM signatures (RFC 6376, rsa-sha256, relaxed/relaxed) for messages we built ourselves.

dkimpy canonicalises the headers and body (its `Relaxed` algorithm) and is what the tests verify
our signatures with. The RSA step is OpenSSL's, through `cryptography`: dkimpy signs in pure
Python (`pow` on 2048-bit numbers, about 15 ms a message, holding the event loop), which would
cap a signing dispatcher near 60 messages a second; OpenSSL takes about a millisecond. Since we
built the message, its header block is ours and simple to split.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import Relaxed

# Header fields we sign when present, in this order; `from` once more so none can be added.
SIGNED_FIELDS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)
_OVERSIGNED = (b"from",)
_FIELD_START = re.compile(rb"\r\n(?![ \t])")


class DkimSigner:
    """Signs for one domain (and its subdomains) with one RSA key."""

    def __init__(self, *, domain: str, selector: str, private_key_pem: str) -> None:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("DKIM_PRIVATE_KEY must be an RSA private key in PEM")
        self._key = key
        self.domain = domain.strip().lower().rstrip(".")
        self.selector = selector.strip()
        if not self.domain or not self.selector:
            raise ValueError("DKIM needs a domain and a selector")

    def covers(self, from_domain: str) -> bool:
        """Whether mail from this domain is ours to sign (aligned with `d=`)."""
        from_domain = from_domain.lower()
        return from_domain == self.domain or from_domain.endswith("." + self.domain)

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """The `DKIM-Signature` field (ending in CRLF) to put in front of `message`."""
        head, sep, body = message.partition(b"\r\n\r\n")
        if not sep:
            head, body = message.removesuffix(b"\r\n"), b""
        fields = [_split_field(raw) for raw in _FIELD_START.split(head)]
        body_hash = hashlib.sha256(Relaxed.canonicalize_body(body)).digest()

        present = {name.lower() for name, _ in fields}
        names = [n for n in SIGNED_FIELDS if n in present] + list(_OVERSIGNED)
        signed_at = int(time.time() if now is None else now)
        tags = (
            f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={self.domain}; s={self.selector};\r\n"
            f"\tt={signed_at}; h={':'.join(n.decode() for n in names)};\r\n"
            f"\tbh={base64.b64encode(body_hash).decode()};\r\n"
            "\tb="
        ).encode()

        hasher = hashlib.sha256()
        for name, value in _select(fields, names):
            hasher.update(_relaxed_field(name, value))
        # The signature's own field is hashed with an empty b= and without its final CRLF.
        hasher.update(_relaxed_field(b"DKIM-Signature", b" " + tags).removesuffix(b"\r\n"))
        signature = self._key.sign(hasher.digest(), padding.PKCS1v15(), _PREHASHED)
        encoded = base64.b64encode(signature)
        folded = b"\r\n\t ".join(encoded[i : i + 64] for i in range(0, len(encoded), 64))
        return b"DKIM-Signature: " + tags + folded + b"\r\n"


_PREHASHED = Prehashed(hashes.SHA256())


def _split_field(raw: bytes) -> tuple[bytes, bytes]:
    name, _, value = raw.partition(b":")
    return name, value


def _relaxed_field(name: bytes, value: bytes) -> bytes:
    ((cname, cvalue),) = Relaxed.canonicalize_headers([(name, value)])
    return bytes(cname) + b":" + bytes(cvalue)


def _select(
    fields: Sequence[tuple[bytes, bytes]], names: Sequence[bytes]
) -> list[tuple[bytes, bytes]]:
    """The fields `names` sign: for repeated names, instances from the bottom up (§5.4.2)."""
    used: dict[bytes, int] = {}
    chosen = []
    for name in names:
        instances = [f for f in fields if f[0].lower() == name]
        taken = used.get(name, 0)
        if taken < len(instances):
            chosen.append(instances[len(instances) - 1 - taken])
        used[name] = taken + 1
    return chosen
