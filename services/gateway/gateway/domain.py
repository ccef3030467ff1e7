"""Pure rules of the gateway: token buckets, media types, entity tags, client addresses.
No I/O."""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Quota:
    """Where a caller stands against one limit, as the `RateLimit-*` headers tell it."""

    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int | None = None

    @property
    def allowed(self) -> bool:
        return self.retry_after is None

    def headers(self) -> dict[str, str]:
        """`RateLimit-Limit`, `-Remaining`, `-Reset` (IETF httpapi draft), and `Retry-After`."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers


def tighter(a: Quota | None, b: Quota | None) -> Quota | None:
    """The quota nearer to being exhausted (a refusal always wins)."""
    if a is None or b is None:
        return a or b
    if a.allowed != b.allowed:
        return a if not a.allowed else b
    return a if a.remaining <= b.remaining else b


class RateLimiter:
    """Token buckets per key: `burst` requests at once, refilled at `rate` per second.

    A full bucket is the same as no bucket, so at most `max_keys` are kept, oldest-touched
    dropped first: memory stays bounded whatever the number of clients.
    """

    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float) -> Quota:
        """Spend one token of `key`'s bucket at time `now` (seconds, monotonic)."""
        tokens, stamp = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - stamp) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            retry_after = None
        else:
            retry_after = max(1, math.ceil((1.0 - tokens) / self.rate))
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return Quota(
            limit=self.burst,
            remaining=int(tokens),
            reset_seconds=math.ceil((self.burst - tokens) / self.rate),
            retry_after=retry_after,
        )


def media_type(content_type: str | None) -> str:
    """The bare media type of a `Content-Type` header, lower-cased, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    """`application/json` or a structured `+json` type (RFC 6839)."""
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def acceptable_body(media: str, allowed: frozenset[str] | None) -> bool:
    """Whether a body of `media` may go to a path that takes `allowed` types (None: any)."""
    if allowed is None:
        return True
    if "application/json" in allowed and is_json(media):
        return True
    return media in allowed


def entity_tag(body: bytes) -> str:
    """A strong entity tag for `body`."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` header names `etag` (weak comparison, RFC 9110 §13.1.2)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(setting: str) -> list[Network]:
    """`GATEWAY_TRUSTED_PROXIES` read: comma-separated addresses or networks (CIDR)."""
    return [ipaddress.ip_network(p.strip(), strict=False) for p in setting.split(",") if p.strip()]


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def forwarded_chain(forwarded_for: str | None, peer: str, proxies: Sequence[Network]) -> list[str]:
    """The `X-Forwarded-For` chain to pass on, ending with the client's address.

    The peer is appended to what it sent only when the peer is a trusted proxy; otherwise what
    it sent is anybody's claim and dropped. From the right, trusted proxies' addresses are then
    taken off: the first address no trusted proxy owns is the client's, and ends the chain
    (addresses left of it are kept, for the record; services read only the last one). An entry
    that is not an address stops the walk at the trusted proxy that wrote it.
    """
    chain = [peer]
    if forwarded_for and _trusted(peer, proxies):
        chain = [e.strip() for e in forwarded_for.split(",")] + chain
    end = len(chain)
    while end > 1 and _trusted(chain[end - 1], proxies):
        try:
            ipaddress.ip_address(chain[end - 2])
        except ValueError:
            break
        end -= 1
    return chain[:end]
