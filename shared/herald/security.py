"""Who is calling: access tokens verified locally, revocations honoured at once, internal calls.

Auth signs short-lived EdDSA JWTs and publishes its public keys at `/.well-known/jwks.json`; every
service verifies tokens itself against those keys (fetched once, refreshed when an unknown `kid`
appears), pinning the algorithm and checking issuer, audience and expiry. A token that is valid
on its face can still be revoked: auth publishes `user.changed` when a user is disabled or their
password reset, and `user.sessions_revoked` (on the same topic) when login sessions end (logout,
a deleted session, a reused refresh token, a password change). Each service keeps what those say
in memory (read from the topic's beginning, no consumer group: every replica needs every change).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import jwt
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from fastapi import Depends, Request

from herald.errors import ApiError
from herald.events import PoisonMessage, decode
from herald.events.auth import SessionsRevoked, UserChanged
from herald.kafka import client_options
from herald.settings import BaseServiceSettings

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"


@dataclass(frozen=True)
class Principal:
    """The verified caller of a request."""

    user_id: uuid.UUID
    account_id: uuid.UUID
    role: Literal["user", "admin"]
    scope: Literal["full", "send"]
    token_id: str
    session_id: uuid.UUID | None
    issued_at: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class InvalidToken(Exception):
    """The token is missing, malformed, forged, expired or revoked."""


class Revocations:
    """What makes a token valid on its face void: per user, the instant before which their tokens
    are void (`user.changed`), and the login sessions that ended (`user.sessions_revoked`).

    Disabling a user moves that instant to now, and auth issues no token to a disabled user, so
    this alone refuses every token of a disabled user without racing a later re-enable. A session
    is remembered only until the last access token it issued expires.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._valid_after: dict[uuid.UUID, float] = {}
        self._sessions: dict[uuid.UUID, float] = {}
        # (until, session id), soonest first: forgetting expired sessions costs O(log n) each.
        self._expiries: list[tuple[float, uuid.UUID]] = []

    def apply(self, change: UserChanged | SessionsRevoked) -> None:
        if isinstance(change, UserChanged):
            self._valid_after[change.user_id] = change.tokens_valid_after or 0.0
            return
        now = self._clock()
        self._forget_expired(now)
        if change.tokens_expire_at <= now:
            return  # read back from the topic's beginning: those tokens are dead anyway
        for session_id in change.session_ids:
            until = max(change.tokens_expire_at, self._sessions.get(session_id, 0.0))
            self._sessions[session_id] = until
            heapq.heappush(self._expiries, (until, session_id))

    def _forget_expired(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            until, session_id = heapq.heappop(self._expiries)
            if self._sessions.get(session_id) == until:
                del self._sessions[session_id]

    def revoked(
        self, user_id: uuid.UUID, issued_at: float, session_id: uuid.UUID | None = None
    ) -> bool:
        """Whether a token of `user_id` issued at `issued_at` (in `session_id`) is void."""
        if issued_at < self._valid_after.get(user_id, 0.0):
            return True
        return session_id is not None and session_id in self._sessions

    def refuses(self, principal: Principal) -> bool:
        """Whether the verified `principal`'s token has been revoked since it was issued."""
        return self.revoked(principal.user_id, principal.issued_at, principal.session_id)


class TokenVerifier:
    """Verifies access tokens against auth's JWKS and the revocations seen so far."""

    def __init__(
        self,
        *,
        jwks_url: str,
        issuer: str,
        audience: str,
        http: httpx.AsyncClient,
        revocations: Revocations,
    ) -> None:
        self._jwks_url = jwks_url
        self._issuer = issuer
        self._audience = audience
        self._http = http
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self.revocations = revocations

    async def _refresh(self, *, min_interval: float = 5.0) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at < min_interval and self._keys:
                return
            response = await self._http.get(self._jwks_url, timeout=5)
            response.raise_for_status()
            keys = {}
            for jwk in response.json().get("keys", []):
                if jwk.get("kid") and jwk.get("kty") == "OKP":
                    keys[jwk["kid"]] = jwt.PyJWK(jwk, algorithm=ALGORITHM)
            self._keys = keys
            self._fetched_at = time.monotonic()

    async def _key(self, kid: str) -> jwt.PyJWK:
        if kid not in self._keys:
            try:
                await self._refresh()
            except (httpx.HTTPError, ValueError) as exc:
                raise InvalidToken(f"signing keys unavailable: {type(exc).__name__}") from None
        key = self._keys.get(kid)
        if key is None:
            raise InvalidToken("unknown signing key")
        return key

    async def verify(self, token: str) -> Principal:
        """The principal a token names, or InvalidToken."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed token") from None
        if header.get("alg") != ALGORITHM or not isinstance(header.get("kid"), str):
            raise InvalidToken("unexpected token algorithm")
        key = await self._key(header["kid"])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
            )
            principal = Principal(
                user_id=uuid.UUID(claims["sub"]),
                account_id=uuid.UUID(claims.get("acc", claims["sub"])),
                role="admin" if claims.get("role") == "admin" else "user",
                scope="send" if claims.get("scope") == "send" else "full",
                token_id=str(claims["jti"]),
                session_id=uuid.UUID(claims["sid"]) if claims.get("sid") else None,
                issued_at=float(claims["iat"]),
            )
        except (jwt.InvalidTokenError, ValueError, KeyError) as exc:
            raise InvalidToken(str(exc) or type(exc).__name__) from None
        if self.revocations.refuses(principal):
            raise InvalidToken("token revoked")
        return principal


class RevocationWatcher:
    """Feeds `Revocations` from the `user.changed` topic, from its beginning, until stopped."""

    def __init__(self, settings: BaseServiceSettings, revocations: Revocations) -> None:
        self._settings = settings
        self._revocations = revocations
        self._stopping = asyncio.Event()
        self.caught_up = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self._follow()
            except (KafkaError, OSError) as exc:
                log.warning("revocation feed interrupted", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _follow(self) -> None:
        topic = UserChanged.TOPIC
        consumer = AIOKafkaConsumer(
            **client_options(self._settings), group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            partitions: set[int] | None = None
            while not partitions and not self._stopping.is_set():
                await consumer.topics()  # refreshes metadata
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    await asyncio.sleep(1)
            assignment = [TopicPartition(topic, p) for p in partitions or ()]
            consumer.assign(assignment)
            await consumer.seek_to_beginning(*assignment)
            end = await consumer.end_offsets(assignment)
            while not self._stopping.is_set():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        self._apply(record.value)
                if not self.caught_up.is_set() and all(
                    [await consumer.position(tp) >= end[tp] for tp in assignment]
                ):
                    self.caught_up.set()
        finally:
            await consumer.stop()

    def _apply(self, raw: bytes | None) -> None:
        try:
            envelope = decode(raw)
        except PoisonMessage as poison:
            log.warning("unreadable user.changed event", extra={"reason": poison.reason})
            return
        if isinstance(envelope.data, UserChanged | SessionsRevoked):
            self._revocations.apply(envelope.data)


@contextlib.asynccontextmanager
async def token_verification(settings: BaseServiceSettings) -> AsyncIterator[TokenVerifier]:
    """A verifier and its revocation feed, for the life of a service."""
    revocations = Revocations()
    watcher = RevocationWatcher(settings, revocations)
    task = asyncio.create_task(watcher.run())
    async with httpx.AsyncClient() as http:
        try:
            yield TokenVerifier(
                jwks_url=f"{settings.auth_url}/.well-known/jwks.json",
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                http=http,
                revocations=revocations,
            )
        finally:
            watcher.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)


def bearer_token(request: Request) -> str | None:
    """The token in `Authorization: Bearer …`, if any."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


_UNAUTHENTICATED = {"WWW-Authenticate": "Bearer"}


async def current_principal(request: Request) -> Principal:
    """FastAPI dependency: the verified caller, or 401."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "unauthorized", "authentication required", headers=_UNAUTHENTICATED)
    verifier = request.app.state.runtime.extras.get("verifier")
    if not isinstance(verifier, TokenVerifier):
        raise RuntimeError("this service was built without token verification")
    try:
        return await verifier.verify(token)
    except InvalidToken:
        raise ApiError(
            401, "invalid_token", "invalid or expired token", headers=_UNAUTHENTICATED
        ) from None


async def full_access(principal: Principal = Depends(current_principal)) -> Principal:
    """FastAPI dependency: a caller whose token is not limited to sending (`send` API keys)."""
    if principal.scope != "full":
        raise ApiError(403, "insufficient_scope", "this API key may only send email")
    return principal


async def admin(principal: Principal = Depends(full_access)) -> Principal:
    """FastAPI dependency: an administrator, or 403."""
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "administrators only")
    return principal


async def internal_caller(request: Request) -> None:
    """FastAPI dependency for `/internal/...`: another Herald service, proven by shared secret."""
    settings: BaseServiceSettings = request.app.state.runtime.settings
    given = request.headers.get("x-internal-token", "")
    expected = settings.internal_token.get_secret_value()
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(403, "forbidden", "internal endpoint")


def internal_headers(settings: BaseServiceSettings) -> dict[str, str]:
    """Headers for calling another service's `/internal/...` endpoints."""
    return {"X-Internal-Token": settings.internal_token.get_secret_value()}
