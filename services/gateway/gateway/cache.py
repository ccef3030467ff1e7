"""Answers to hot reads, kept for a few seconds, with entity tags for conditional requests.

Only `200` answers of whitelisted GET paths (routes.CACHED) are kept, per account unless the
answer is the same for everyone (JWKS), and only while small. A client that sends
`Cache-Control: no-cache` always reaches the service (and refreshes the entry).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gateway.domain import entity_tag


@dataclass(frozen=True)
class Answer:
    """One upstream answer as relayed: status, headers, body and its entity tag."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    etag: str
    expires: float


class ResponseCache:
    """A bounded map from request key to a fresh answer."""

    def __init__(
        self,
        *,
        shared_seconds: float,
        private_seconds: float,
        max_entries: int = 10_000,
        max_body_bytes: int = 2 * 1024 * 1024,
    ) -> None:
        self.shared_seconds = shared_seconds
        self.private_seconds = private_seconds
        self.max_body_bytes = max_body_bytes
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, ...], Answer] = OrderedDict()

    def seconds(self, *, shared: bool) -> float:
        """How long an answer is kept: shared ones (JWKS) and per-account ones (reports)."""
        return self.shared_seconds if shared else self.private_seconds

    def get(self, key: tuple[str, ...], now: float) -> Answer | None:
        """The fresh answer kept under `key`, if any."""
        answer = self._entries.get(key)
        if answer is None:
            return None
        if answer.expires <= now:
            del self._entries[key]
            return None
        return answer

    def put(
        self,
        key: tuple[str, ...],
        *,
        status: int,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
        expires: float,
    ) -> Answer:
        """Keep an answer until `expires` (if small enough) and return it with its tag."""
        answer = Answer(
            status=status, headers=headers, body=body, etag=entity_tag(body), expires=expires
        )
        if len(body) <= self.max_body_bytes:
            self._entries.pop(key, None)
            self._entries[key] = answer
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return answer
