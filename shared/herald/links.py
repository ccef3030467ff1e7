"""Signed tokens for links in mail: opens, clicks, unsubscribes.

A token is `<payload>.<kid>.<mac>`: the payload is compact JSON in base64url, `kid` names the key
that signed it (so keys rotate: sign with the newest, verify with any listed), and the MAC is
HMAC-SHA256 over the purpose and the payload, truncated to 128 bits. The purpose inside the MAC
keeps a token minted for one use (a click) from being accepted for another (an unsubscribe).
Tokens carry what the hot path needs (a click's URL), so answering one needs no database, and
the URL cannot be altered: there is no open redirect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from typing import Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

Purpose = Literal["open", "click", "unsubscribe"]


class _Token(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OpenToken(_Token):
    """Who opened which email: the message id and email id."""

    m: str
    e: uuid.UUID
    a: uuid.UUID


class ClickToken(_Token):
    """A rewritten link: the message, the email, the link's position and its target."""

    m: str
    e: uuid.UUID
    a: uuid.UUID
    i: int
    u: str


class UnsubscribeToken(_Token):
    """Unsubscribe this address of this account (and say which email it came from)."""

    a: uuid.UUID
    r: str
    e: uuid.UUID | None = None


T = TypeVar("T", bound=_Token)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_keys(spec: str) -> dict[str, bytes]:
    """`kid:secret,kid:secret` (newest first) into an ordered mapping."""
    keys: dict[str, bytes] = {}
    for part in spec.split(","):
        kid, sep, secret = part.strip().partition(":")
        if not sep or not kid or not secret or not kid.isalnum():
            raise ValueError("link signing keys must look like 'kid:secret,kid:secret'")
        keys[kid] = secret.encode()
    return keys


class LinkSigner:
    """Signs with the newest key, verifies with any of them."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise ValueError("at least one link signing key is needed")
        self._keys = keys
        self._current = next(iter(keys))

    @classmethod
    def from_spec(cls, spec: str) -> LinkSigner:
        return cls(parse_keys(spec))

    def _mac(self, kid: str, purpose: Purpose, payload: str) -> bytes:
        digest = hmac.new(self._keys[kid], f"{purpose}.{payload}".encode(), hashlib.sha256)
        return _b64(digest.digest()[:16]).encode()

    def sign(self, purpose: Purpose, token: _Token) -> str:
        """A URL-safe token for `token`'s fields."""
        payload = _b64(orjson.dumps(token.model_dump(mode="json", exclude_none=True)))
        return f"{payload}.{self._current}.{self._mac(self._current, purpose, payload).decode()}"

    def verify(self, purpose: Purpose, text: str, model: type[T]) -> T | None:
        """The token's fields if it is genuine and meant for `purpose`; None otherwise."""
        # A genuine token is base64url and an alphanumeric kid; anything else (non-ASCII, lone
        # surrogates from a percent-decoded URL) is forged and must not reach the encoders.
        if len(text) > 4096 or not text.isascii():
            return None
        parts = text.split(".")
        if len(parts) != 3:
            return None
        payload, kid, mac = parts
        if kid not in self._keys:
            return None
        # Bytes: compare_digest refuses str holding anything but ASCII with a TypeError.
        if not hmac.compare_digest(mac.encode(), self._mac(kid, purpose, payload)):
            return None
        try:
            return model.model_validate(orjson.loads(_unb64(payload)))
        except (ValueError, ValidationError):
            return None
