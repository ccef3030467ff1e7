"""API keys at the gateway: exchanged with auth for a short-lived access token, cached briefly.

Services only ever see access tokens, so they verify every caller the same way. The cache is
short (the token's life and at most `max_age` seconds), so a revoked key stops working within
seconds, and a disabled user's exchanged tokens are refused by every verifier at once anyway.
"""

from __future__ import annotations

import hashlib
import time

import aiohttp
import orjson

from herald.errors import ApiError

API_KEY_PREFIX = "hk_"
_TIMEOUT = aiohttp.ClientTimeout(total=5)


class ApiKeyExchanger:
    """Turns `hk_…` keys into access tokens through auth's internal endpoint."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        auth_url: str,
        headers: dict[str, str],
        max_age: float,
    ) -> None:
        self._session = session
        self._url = f"{auth_url}/internal/api-keys/exchange"
        # The forwarding session adds no Content-Type of its own.
        self._headers = headers | {"Content-Type": "application/json"}
        self._max_age = max_age
        self._cache: dict[bytes, tuple[str, float]] = {}

    async def access_token(self, api_key: str) -> str:
        """The access token for `api_key`, or 401."""
        digest = hashlib.sha256(api_key.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            async with self._session.post(
                self._url,
                data=orjson.dumps({"api_key": api_key}),
                headers=self._headers,
                timeout=_TIMEOUT,
            ) as response:
                status = response.status
                body = await response.json() if status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise ApiError(503, "service_unavailable", "the auth service is unavailable") from None
        if status in (404, 422):
            self._cache.pop(digest, None)
            raise ApiError(
                401, "invalid_token", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
            )
        if body is None:
            raise ApiError(503, "service_unavailable", "the auth service is unavailable")
        lifetime = min(float(body["expires_in"]) - 10, self._max_age)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (body["access_token"], now + lifetime)
        return str(body["access_token"])
