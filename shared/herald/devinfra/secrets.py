"""Secrets for the development stack: made once per data directory, kept across restarts.

Production sets these variables itself (and the services refuse the built-in placeholders);
`make run` and the tests get real, random ones so that nothing runs on a published secret.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def _ed25519_pem() -> str:
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _token() -> str:
    return secrets.token_urlsafe(32)


def _link_keys() -> str:
    return "k1:" + secrets.token_urlsafe(32)


_MAKERS: dict[str, Callable[[], str]] = {
    "JWT_PRIVATE_KEY": _ed25519_pem,
    "INTERNAL_TOKEN": _token,
    "LINK_SIGNING_KEYS": _link_keys,
    # The bootstrap administrator's password (ADMIN_EMAIL defaults to admin@herald.example).
    "ADMIN_PASSWORD": _token,
}


def development_secrets(directory: Path) -> dict[str, str]:
    """Each secret the services need, read from `directory` or made and stored there."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    values = {}
    for name, make in _MAKERS.items():
        path = directory / name.lower()
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(make())
        values[name] = path.read_text()
    return values
