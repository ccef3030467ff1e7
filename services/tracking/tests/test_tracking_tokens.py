"""The hot path's token reader answers exactly as the shared LinkSigner does, for less."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

import orjson
import pytest

from herald.links import ClickToken, LinkSigner, OpenToken, UnsubscribeToken
from tracking.hotpath import TokenReader

KEYS = "new:first-secret-of-thirty-two-bytes,old:an-older-secret-still-accepted"
SIGNER = LinkSigner.from_spec(KEYS)
READER = TokenReader(KEYS)
EMAIL, ACCOUNT = uuid.uuid4(), uuid.uuid4()


def signed(payload: object, purpose: str) -> str:
    """`payload` signed with the newest key, as only a holder of the key can."""
    body = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()
    secret = b"first-secret-of-thirty-two-bytes"
    digest = hmac.new(secret, f"{purpose}.{body}".encode(), hashlib.sha256).digest()[:16]
    return f"{body}.new.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


def test_genuine_tokens_read_as_the_signer_reads_them():
    opened = SIGNER.sign("open", OpenToken(m="<1.x@h>", e=EMAIL, a=ACCOUNT))
    assert READER.open(opened) == ("<1.x@h>", EMAIL, ACCOUNT)
    click = ClickToken(m="1.x@h", e=EMAIL, a=ACCOUNT, i=3, u="https://example.com/a?b=c")
    clicked = SIGNER.sign("click", click)
    assert READER.click(clicked) == ("1.x@h", EMAIL, ACCOUNT, 3, "https://example.com/a?b=c")
    # A token signed with an older key that is still listed is accepted too.
    older = LinkSigner.from_spec("old:an-older-secret-still-accepted")
    assert READER.open(older.sign("open", OpenToken(m="m", e=EMAIL, a=ACCOUNT))) is not None


def test_a_token_is_good_only_for_its_own_purpose():
    opened = SIGNER.sign("open", OpenToken(m="m", e=EMAIL, a=ACCOUNT))
    clicked = SIGNER.sign("click", ClickToken(m="m", e=EMAIL, a=ACCOUNT, i=0, u="https://a.b/"))
    unsubscribe = SIGNER.sign("unsubscribe", UnsubscribeToken(a=ACCOUNT, r="x@example.com"))
    assert READER.click(opened) is None
    assert READER.open(clicked) is None
    assert READER.open(unsubscribe) is None
    assert READER.click(unsubscribe) is None


def flipped(token: str, at: int) -> str:
    return token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a.b",
        "a.b.c.d",
        "nonsense.new.nonsense",
        # Non-ASCII in the MAC (a percent-encoded path) must be refused, not raise.
        "eyJ9.new.é",
        "eyJ9.new.\x00",
        "x" * 5000,
    ],
)
def test_malformed_tokens_are_refused_without_raising(text: str):
    assert READER.open(text) is None
    assert READER.click(text) is None


def test_altered_tokens_and_unknown_keys_are_refused_as_the_signer_refuses_them():
    opened = SIGNER.sign("open", OpenToken(m="m", e=EMAIL, a=ACCOUNT))
    payload, kid, mac = opened.split(".")
    for at in (0, len(payload) // 2, len(opened) - 1):
        altered = flipped(opened, at)
        assert READER.open(altered) is None
        assert SIGNER.verify("open", altered, OpenToken) is None
    assert READER.open(f"{payload}.unknown.{mac}") is None
    assert READER.open(f"{payload}.{kid}.{mac}=") is None


def test_payloads_the_signer_would_refuse_are_refused_even_with_a_good_mac():
    # A good MAC over an odd payload can only come from a leaked key; the answer is still 404.
    good = {"m": "m", "e": str(EMAIL), "a": str(ACCOUNT)}
    assert READER.open(signed(good, "open")) == ("m", EMAIL, ACCOUNT)  # the helper signs right
    bad: list[object] = [
        {"m": "m", "e": str(EMAIL)},
        good | {"x": 1},
        good | {"m": 1},
        good | {"e": "not-a-uuid"},
        [1, 2],
        "text",
    ]
    for payload in bad:
        assert READER.open(signed(payload, "open")) is None, payload
        assert SIGNER.verify("open", signed(payload, "open"), OpenToken) is None, payload
    click = good | {"i": 2, "u": "https://a.b/"}
    assert READER.click(signed(click, "click")) == ("m", EMAIL, ACCOUNT, 2, "https://a.b/")
    for payload in (click | {"i": True}, click | {"i": "2"}, click | {"u": None}):
        assert READER.click(signed(payload, "click")) is None, payload
