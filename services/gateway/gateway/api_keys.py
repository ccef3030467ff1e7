"""API keys at the gateway: exchanged with auth for a short-lived access token, cached briefly.

Services only ever see access tokens, so they verify every caller the same way. The cache is
short (the token's life and at most `max_age` seconds), so a revoked key stops working within
seconds, and a disabled user's exchanged tokens are refused by every verifier at once anyway.
"""

from __future__ import annotations

import hashlib
import time

import httpx

from herald.errors import ApiError

API_KEY_PREFIX = "hk_"


class ApiKeyExchanger:
    """Turns `hk_…` keys into access tokens through auth's internal endpoint."""

    def __init__(
        self, *, client: httpx.AsyncClient, auth_url: str, headers: dict[str, str], max_age: float
    ) -> None:
        self._client = client
        self._url = f"{auth_url}/internal/api-keys/exchange"
        self._headers = headers
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
            response = await self._client.post(
                self._url, json={"api_key": api_key}, headers=self._headers, timeout=5
            )
        except httpx.HTTPError:
            raise ApiError(503, "service_unavailable", "the auth service is unavailable") from None
        if response.status_code in (404, 422):
            self._cache.pop(digest, None)
            raise ApiError(
                401, "invalid_token", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
            )
        if response.status_code != 200:
            raise ApiError(503, "service_unavailable", "the auth service is unavailable")
        body = response.json()
        lifetime = min(float(body["expires_in"]) - 10, self._max_age)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (body["access_token"], now + lifetime)
        return str(body["access_token"])
