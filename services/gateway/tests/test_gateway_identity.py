"""Unit tests of the cache of verified tokens: kept until the token's own expiry, bounded."""

import base64
import json
import time
import uuid

from gateway.identity import VerifiedTokens
from herald.security import Principal


def _token(exp: float) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part({'exp': exp, 'sub': 'x'})}.signature"


def _principal() -> Principal:
    user = uuid.uuid4()
    return Principal(
        user_id=user,
        account_id=user,
        role="user",
        scope="full",
        token_id="j",
        session_id=None,
        issued_at=time.time(),
    )


def test_a_token_is_kept_until_it_expires_and_no_longer():
    cache = VerifiedTokens(max_age=60)
    principal = _principal()
    token = _token(time.time() + 5)
    cache.put(token, principal, now=100.0)
    assert cache.get(token, now=101.0) is principal
    assert cache.get(token, now=106.0) is None  # its exp has passed
    long_lived = _token(time.time() + 3600)
    cache.put(long_lived, principal, now=100.0)
    assert cache.get(long_lived, now=159.0) is principal
    assert cache.get(long_lived, now=161.0) is None  # never longer than max_age


def test_expired_or_unreadable_tokens_are_not_kept():
    cache = VerifiedTokens()
    for token in (_token(time.time() - 1), "not-a-token", "a.!!!.c", "a.e30.c"):
        cache.put(token, _principal(), now=0.0)
        assert cache.get(token, now=0.0) is None


def test_the_cache_is_bounded():
    cache = VerifiedTokens(max_entries=2)
    tokens = [_token(time.time() + 60 + i) for i in range(3)]
    for token in tokens:
        cache.put(token, _principal(), now=0.0)
    assert cache.get(tokens[0], now=0.0) is None
    assert cache.get(tokens[2], now=0.0) is not None
