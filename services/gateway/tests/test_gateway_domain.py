"""Unit tests of the gateway's pure rules: buckets, routes, media types, entity tags, client
addresses."""

import pytest

from gateway.domain import (
    Quota,
    RateLimiter,
    acceptable_body,
    entity_tag,
    forwarded_chain,
    matches,
    media_type,
    tighter,
    trusted_networks,
)
from gateway.routes import body_types, cache_scope, is_public, is_upload, service_for


def test_a_bucket_allows_its_burst_then_refills_at_its_rate():
    limiter = RateLimiter(rate=2, burst=3)
    quotas = [limiter.take("a", now=100.0) for _ in range(4)]
    assert [q.allowed for q in quotas] == [True, True, True, False]
    assert [q.remaining for q in quotas] == [2, 1, 0, 0]
    assert quotas[3].retry_after == 1
    assert quotas[3].headers()["Retry-After"] == "1"
    assert quotas[0].headers() == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "2",
        "RateLimit-Reset": "1",
    }
    assert limiter.take("a", now=100.5).allowed  # one token back after half a second at 2/s
    assert not limiter.take("a", now=100.5).allowed
    assert limiter.take("b", now=100.5).allowed  # other keys have their own bucket
    assert limiter.take("a", now=1000.0).remaining == 2  # never more than the burst


def test_a_slow_bucket_says_how_long_to_wait():
    limiter = RateLimiter(rate=0.1, burst=1)
    assert limiter.take("k", now=0).allowed
    refused = limiter.take("k", now=0)
    assert refused.retry_after == 10
    assert refused.reset_seconds == 10


def test_buckets_are_bounded_in_number():
    limiter = RateLimiter(rate=1, burst=1, max_keys=3)
    for key in "abcd":
        limiter.take(key, now=0)
    # "a" was dropped (a full bucket is the same as none), so it starts full again.
    assert limiter.take("a", now=0).allowed
    assert not limiter.take("d", now=0).allowed


def test_a_rate_of_zero_turns_the_limit_off():
    assert not RateLimiter(rate=0, burst=10).enabled


def test_the_tighter_quota_is_reported():
    loose = Quota(limit=100, remaining=90, reset_seconds=1)
    tight = Quota(limit=10, remaining=2, reset_seconds=4)
    refused = Quota(limit=100, remaining=0, reset_seconds=9, retry_after=1)
    assert tighter(loose, tight) is tight
    assert tighter(tight, refused) is refused
    assert tighter(None, loose) is loose
    assert tighter(None, None) is None


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/signup", "auth"),
        ("/signup/confirm", "auth"),
        ("/contacts/import/abc", "contacts"),
        ("/reports", "tracking"),
        ("/t/o/token", "tracking"),
        ("/admin/users/1", "auth"),
        ("/admin/system", None),
        ("/internal/stats", None),
        ("/contacts/internal/x", None),
        ("/contacts/../internal", None),
        ("/contacts/./x", None),
        ("/tracker", None),
        ("/", None),
    ],
)
def test_routes(path, service):
    assert service_for(path) == service


def test_public_paths():
    public = ["/signup", "/signup/confirm", "/login/mfa", "/token/refresh", "/password/reset"]
    public += ["/unsubscribe/x", "/t/c/x", "/webhooks/ses", "/.well-known/jwks.json"]
    private = ["/token/other", "/profile", "/contacts", "/logout", "/admin/users", "/reports"]
    assert all(is_public(p) for p in public)
    assert not any(is_public(p) for p in private)


def test_body_types_per_path():
    assert body_types("/contacts") == frozenset({"application/json"})
    assert body_types("/contacts/import") == frozenset({"multipart/form-data"})
    assert "application/x-www-form-urlencoded" in (body_types("/unsubscribe/x") or ())
    assert body_types("/password/reset") == frozenset(
        {"application/json", "application/x-www-form-urlencoded"}
    )
    assert body_types("/password/forgot") == frozenset({"application/json"})
    assert body_types("/webhooks/ses") is None
    assert is_upload("/contacts/import")
    assert not is_upload("/contacts")
    assert cache_scope("/reports") is False
    assert cache_scope("/.well-known/jwks.json") is True
    assert cache_scope("/contacts") is None


@pytest.mark.parametrize(
    ("content_type", "allowed", "ok"),
    [
        ("application/json", {"application/json"}, True),
        ("Application/JSON; charset=utf-8", {"application/json"}, True),
        ("application/merge-patch+json", {"application/json"}, True),
        ("text/plain", {"application/json"}, False),
        ("", {"application/json"}, False),
        ("multipart/form-data; boundary=x", {"multipart/form-data"}, True),
        ("application/json", {"multipart/form-data"}, False),
        ("text/plain", None, True),
    ],
)
def test_acceptable_bodies(content_type, allowed, ok):
    allowed_set = frozenset(allowed) if allowed is not None else None
    assert acceptable_body(media_type(content_type), allowed_set) is ok


def test_entity_tags_and_conditional_requests():
    tag = entity_tag(b"body")
    assert tag.startswith('"')
    assert tag.endswith('"')
    assert tag == entity_tag(b"body") != entity_tag(b"other")
    assert matches(tag, tag)
    assert matches(f'"x", W/{tag}', tag)
    assert matches("*", tag)
    assert not matches('"x"', tag)
    assert not matches(None, tag)


PROXIES = trusted_networks("127.0.0.1, ::1, 10.8.0.0/16")


@pytest.mark.parametrize(
    ("forwarded_for", "peer", "chain"),
    [
        # No proxy in front: the peer is the client, whatever it claims.
        (None, "203.0.113.5", ["203.0.113.5"]),
        ("198.51.100.1", "203.0.113.5", ["203.0.113.5"]),
        # A trusted proxy: what it appended is the client; the peer's own address is dropped.
        ("198.51.100.1", "127.0.0.1", ["198.51.100.1"]),
        # Through two trusted proxies; the client's own claim (left) is kept but not believed.
        ("6.6.6.6, 198.51.100.1, 10.8.3.4", "127.0.0.1", ["6.6.6.6", "198.51.100.1"]),
        # A client spoofing a trusted address behind an untrusted hop is not walked past.
        ("10.8.0.1, 198.51.100.1", "::1", ["10.8.0.1", "198.51.100.1"]),
        # A trusted proxy that passed on no address, or a malformed one.
        (None, "127.0.0.1", ["127.0.0.1"]),
        ("not-an-address", "10.8.0.2", ["not-an-address", "10.8.0.2"]),
        (" , ", "127.0.0.1", ["", "", "127.0.0.1"]),
        # Every hop trusted: the first one is the client.
        ("10.8.0.9, 10.8.0.3", "127.0.0.1", ["10.8.0.9"]),
    ],
)
def test_the_client_is_the_first_address_no_trusted_proxy_owns(
    forwarded_for: str | None, peer: str, chain: list[str]
):
    assert forwarded_chain(forwarded_for, peer, PROXIES) == chain


def test_no_trusted_proxies_means_the_peer_is_always_the_client():
    assert forwarded_chain("198.51.100.1", "127.0.0.1", trusted_networks("")) == ["127.0.0.1"]


def test_a_bad_trusted_proxy_setting_is_refused():
    with pytest.raises(ValueError, match=r"10\.0\.0\.300"):
        trusted_networks("127.0.0.1, 10.0.0.300")
