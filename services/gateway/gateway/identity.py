"""Who is calling, decided at the gateway before anything is forwarded.

Bearer tokens are verified with the shared verifier (auth's JWKS, cached and refreshed on an
unknown key id; revocations followed from `user.changed`); `hk_…` API keys are exchanged for a
short-lived access token first. The services verify the forwarded token again: the gateway's
check keeps unauthenticated traffic off them, it does not replace theirs.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, TypeVar

import orjson
from fastapi import Depends, Request

from gateway.api_keys import API_KEY_PREFIX, ApiKeyExchanger
from gateway.domain import RateLimiter, tighter
from gateway.metrics import REJECTED
from herald.errors import ApiError
from herald.security import InvalidToken, Principal, TokenVerifier, bearer_token

_CHALLENGE = {"WWW-Authenticate": "Bearer"}

T = TypeVar("T")


class VerifiedTokens:
    """Tokens verified recently, so that a client's next call skips the signature check.

    Kept until the token's own expiry (at most `max_age` seconds); revocations are still checked
    on every call, against the verifier's live revocation state.
    """

    def __init__(self, *, max_age: float = 60.0, max_entries: int = 10_000) -> None:
        self._max_age = max_age
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def get(self, token: str, now: float) -> Principal | None:
        """The principal of a token verified before and not expired since, if any."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[token]
            return None
        return entry[0]

    def put(self, token: str, principal: Principal, now: float) -> None:
        """Remember a token just verified, until it expires."""
        expires = _expiry(token)
        if expires is None:
            return
        # `exp` is wall-clock time; the cache runs on the monotonic clock.
        until = now + min(self._max_age, expires - time.time())
        if until > now:
            self._entries[token] = (principal, until)
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)


def _expiry(token: str) -> float | None:
    # Only read after the signature was verified, so the claim can be trusted.
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error, orjson.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Caller:
    """A verified caller and the access token the services get from the gateway."""

    principal: Principal
    access_token: str


def extra(request: Request, name: str, kind: type[T]) -> T:
    """A resource the gateway's workers opened (`runtime.extras[name]`), of the expected type."""
    value = request.app.state.runtime.extras.get(name)
    if not isinstance(value, kind):
        raise RuntimeError(f"the gateway was built without {name}")
    return value


async def authenticate(request: Request) -> Caller:
    """The verified caller of `request`, or 401."""
    token = bearer_token(request)
    if token is None:
        REJECTED.labels("unauthenticated").inc()
        raise ApiError(401, "unauthorized", "authentication required", headers=_CHALLENGE)
    access = token
    if token.startswith(API_KEY_PREFIX):
        access = await extra(request, "api_keys", ApiKeyExchanger).access_token(token)
    verifier = extra(request, "verifier", TokenVerifier)
    verified = extra(request, "verified_tokens", VerifiedTokens)
    now = time.monotonic()
    principal = verified.get(access, now)
    # A cached token is checked against the live revocations: its user's cut-off and its login
    # session (logout), so a logged-out token is refused here, not only by the services.
    if principal is not None and verifier.revocations.refuses(principal):
        principal = None
    if principal is None:
        try:
            principal = await verifier.verify(access)
        except InvalidToken:
            REJECTED.labels("invalid_token").inc()
            raise ApiError(
                401, "invalid_token", "invalid or expired token", headers=_CHALLENGE
            ) from None
        verified.put(access, principal, now)
    return Caller(principal=principal, access_token=access)


def limit_account(request: Request, principal: Principal) -> None:
    """Spend one request of the caller's account, or 429."""
    limiter = extra(request, "account_limiter", RateLimiter)
    if not limiter.enabled:
        return
    quota = limiter.take(str(principal.account_id), time.monotonic())
    request.state.quota = tighter(getattr(request.state, "quota", None), quota)
    if not quota.allowed:
        REJECTED.labels("account_rate_limited").inc()
        raise ApiError(
            429, "rate_limited", "too many requests for this account", headers=quota.headers()
        )


async def caller(request: Request) -> Caller:
    """FastAPI dependency for the gateway's own routes: an authenticated, rate-limited caller."""
    found = await authenticate(request)
    limit_account(request, found.principal)
    return found


async def administrator(found: Annotated[Caller, Depends(caller)]) -> Caller:
    """FastAPI dependency: an administrator with full access, or 403."""
    if found.principal.scope != "full":
        raise ApiError(403, "insufficient_scope", "this API key may only send email")
    if not found.principal.is_admin:
        raise ApiError(403, "forbidden", "administrators only")
    return found
