"""Signed link tokens for one email's messages, minted byte for byte as `LinkSigner.sign` does.

A newsletter has a dozen links, each needing a click token per recipient, and `LinkSigner.sign`
builds and validates a model, dumps and encodes it for each (about 10 µs). Only the message id
`m` differs between recipients, and it comes first in the token's JSON and is 36 characters
long, so the JSON splits at a multiple of three bytes: the base64 of what follows `m` is worked
out once per link and email, and the base64 of `{"m":"<id>` once per message. What remains per
token is one HMAC. Unsubscribe tokens start with the account id, also 36 characters long.
`tests/test_dispatcher_tokens.py` holds the output to `LinkSigner.sign`'s.
"""

from __future__ import annotations

import base64
import hashlib
import uuid

import orjson

from herald.links import ClickToken, LinkSigner, OpenToken, Purpose, UnsubscribeToken, parse_keys

_M_PREFIX = b'{"m":"'
_M_LENGTH = 36  # str(uuid.UUID(...))
_PLACEHOLDER = "0" * _M_LENGTH
# Per-email cache of click-token tails; personalised URLs beyond this are minted uncached.
_MAX_CACHED_LINKS = 2000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def message_part(message_id: str) -> str:
    """The base64 of `{"m":"<message_id>`, shared by every token of one message."""
    if len(message_id) != _M_LENGTH or not message_id.isascii():
        raise ValueError("message ids are canonical UUID strings")
    return base64.urlsafe_b64encode(_M_PREFIX + message_id.encode()).decode()


# HMAC's key pads as translation tables (RFC 2104).
_INNER_PAD = bytes(b ^ 0x36 for b in range(256))
_OUTER_PAD = bytes(b ^ 0x5C for b in range(256))


class TokenMint:
    """Mints tokens with the newest link signing key, as `LinkSigner` would.

    The HMAC-SHA256 of each token starts from hash states that already took in the padded key
    (RFC 2104), which halves its cost next to `hmac.digest` setting the key up every time.
    """

    def __init__(self, spec: str) -> None:
        keys = parse_keys(spec)
        self._signer = LinkSigner(keys)
        self._kid, key = next(iter(keys.items()))
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(key.translate(_INNER_PAD))
        self._outer = hashlib.sha256(key.translate(_OUTER_PAD))

    def _seal(self, purpose: Purpose, payload: str) -> str:
        inner = self._inner.copy()
        inner.update(f"{purpose}.{payload}".encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return f"{payload}.{self._kid}.{_b64(outer.digest()[:16])}"

    def unsubscribe(self, *, account_id: uuid.UUID, recipient: str, email_id: uuid.UUID) -> str:
        """The token of an unsubscribe link, as `LinkSigner.sign` makes it (for the tests)."""
        return self._signer.sign(
            "unsubscribe", UnsubscribeToken(a=account_id, r=recipient, e=email_id)
        )

    def for_email(self, *, email_id: uuid.UUID, account_id: uuid.UUID) -> EmailTokens:
        """A minter of one email's open and click tokens."""
        return EmailTokens(self, email_id=email_id, account_id=account_id)


def _tail(token: OpenToken | ClickToken) -> str:
    """The base64 of the token's JSON after its `m` value (with the placeholder as `m`)."""
    dumped = orjson.dumps(token.model_dump(mode="json", exclude_none=True))
    head = _M_PREFIX + _PLACEHOLDER.encode()
    if not dumped.startswith(head):
        raise RuntimeError("link tokens no longer start with their message id")
    return _b64(dumped[len(head) :])


class EmailTokens:
    """Open, click and unsubscribe tokens of one email, per message."""

    def __init__(self, mint: TokenMint, *, email_id: uuid.UUID, account_id: uuid.UUID) -> None:
        self._mint = mint
        self._email_id = email_id
        self._account_id = account_id
        self._open_tail = _tail(OpenToken(m=_PLACEHOLDER, e=email_id, a=account_id))
        self._click_tails: dict[tuple[int, str], str] = {}
        # An unsubscribe token's JSON starts with the account id, also 36 characters: the same
        # split works, with the recipient's address in the per-message part.
        sample = orjson.dumps(
            UnsubscribeToken(a=account_id, r="", e=email_id).model_dump(
                mode="json", exclude_none=True
            )
        )
        head = f'{{"a":"{account_id}'.encode()
        if not sample.startswith(head + b'","r":"",'):
            raise RuntimeError("unsubscribe tokens no longer start with the account id")
        self._unsubscribe_head = base64.urlsafe_b64encode(head).decode()
        self._unsubscribe_end = sample[len(head) + len(b'","r":""') :]

    def unsubscribe(self, recipient: str) -> str:
        """The unsubscribe token of `recipient` for this email."""
        tail = b'","r":' + orjson.dumps(recipient) + self._unsubscribe_end
        return self._mint._seal("unsubscribe", self._unsubscribe_head + _b64(tail))

    def open(self, m_part: str) -> str:
        """The open token of the message whose `message_part` is `m_part`."""
        return self._mint._seal("open", m_part + self._open_tail)

    def click(self, m_part: str, index: int, url: str) -> str:
        """The click token of link `index` (to `url`) in that message."""
        key = (index, url)
        tail = self._click_tails.get(key)
        if tail is None:
            token = ClickToken(m=_PLACEHOLDER, e=self._email_id, a=self._account_id, i=index, u=url)
            tail = _tail(token)
            if len(self._click_tails) < _MAX_CACHED_LINKS:
                self._click_tails[key] = tail
        return self._mint._seal("click", m_part + tail)
