"""The other services campaign calls: contacts (audiences, preview contacts) and auth (API keys,
a user's current state)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field, ValidationError

from herald.events.auth import UserChanged


class Unavailable(Exception):
    """The other service did not answer usefully; asking again later may work."""


class Refused(Exception):
    """The other service refused the request itself."""


class Contact(BaseModel):
    """A recipient as the contacts service resolves it."""

    email: str
    contact_id: uuid.UUID | None = None
    first_name: str | None = None
    last_name: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class _Page(BaseModel):
    items: list[Contact]
    next_cursor: str | None = None


async def _post(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    try:
        response = await http.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{url}: {type(exc).__name__}") from None
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise Unavailable(f"{url}: HTTP {response.status_code}")
    return response


async def _get(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    try:
        response = await http.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise Unavailable(f"{url}: {type(exc).__name__}") from None
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise Unavailable(f"{url}: HTTP {response.status_code}")
    return response


class _Owned(BaseModel):
    unknown_list_ids: list[uuid.UUID]
    unknown_contact_ids: list[uuid.UUID]


# The most addresses `/internal/suppressed` takes at once.
_SUPPRESSED_CHUNK = 5000


class _Suppressed(BaseModel):
    suppressed: list[str]


class ContactsClient:
    """`POST /internal/recipients`, `/internal/owned` and `/internal/suppressed` of the contacts
    service."""

    def __init__(self, http: httpx.AsyncClient, *, base_url: str, headers: dict[str, str]) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + "/internal/recipients"
        self._owned_url = base_url.rstrip("/") + "/internal/owned"
        self._suppressed_url = base_url.rstrip("/") + "/internal/suppressed"
        self._headers = headers

    async def unknown(
        self,
        *,
        account_id: uuid.UUID,
        list_ids: Sequence[uuid.UUID],
        contact_ids: Sequence[uuid.UUID],
    ) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        """The list ids and contact ids that are not the account's."""
        if not list_ids and not contact_ids:
            return [], []
        body = {
            "account_id": str(account_id),
            "list_ids": [str(i) for i in list_ids],
            "contact_ids": [str(i) for i in contact_ids],
        }
        response = await _post(self._http, self._owned_url, body, self._headers)
        if response.status_code != 200:
            raise Unavailable(f"{self._owned_url}: HTTP {response.status_code}")
        try:
            owned = _Owned.model_validate_json(response.content)
        except ValidationError:
            raise Unavailable("contacts: unreadable answer") from None
        return owned.unknown_list_ids, owned.unknown_contact_ids

    async def suppressed(self, *, account_id: uuid.UUID, emails: Sequence[str]) -> set[str]:
        """Those of `emails` that must not be mailed any more (lower-cased)."""
        found: set[str] = set()
        for start in range(0, len(emails), _SUPPRESSED_CHUNK):
            body = {
                "account_id": str(account_id),
                "emails": list(emails[start : start + _SUPPRESSED_CHUNK]),
            }
            response = await _post(self._http, self._suppressed_url, body, self._headers)
            if response.status_code != 200:
                raise Unavailable(f"{self._suppressed_url}: HTTP {response.status_code}")
            try:
                answer = _Suppressed.model_validate_json(response.content)
            except ValidationError:
                raise Unavailable("contacts: unreadable answer") from None
            found |= {e.lower() for e in answer.suppressed}
        return found

    async def _page(
        self,
        account_id: uuid.UUID,
        list_ids: Sequence[uuid.UUID],
        contact_ids: Sequence[uuid.UUID],
        after: str | None,
        limit: int,
    ) -> _Page:
        body = {
            "account_id": str(account_id),
            "list_ids": [str(i) for i in list_ids],
            "contact_ids": [str(i) for i in contact_ids],
            "after": after,
            "limit": limit,
        }
        response = await _post(self._http, self._url, body, self._headers)
        if response.status_code == 404:
            raise Unavailable(f"{self._url}: HTTP 404")
        if response.status_code >= 400:
            raise Refused(f"contacts: HTTP {response.status_code}: {response.text[:200]}")
        try:
            return _Page.model_validate_json(response.content)
        except ValidationError:
            raise Unavailable("contacts: unreadable answer") from None

    async def contact(self, *, account_id: uuid.UUID, contact_id: uuid.UUID) -> Contact | None:
        """One active contact of the account, or None."""
        page = await self._page(account_id, [], [contact_id], None, 1)
        return page.items[0] if page.items else None

    async def count(
        self,
        *,
        account_id: uuid.UUID,
        list_ids: Sequence[uuid.UUID],
        contact_ids: Sequence[uuid.UUID],
        exclude: set[str],
        stop_after: int,
    ) -> int:
        """How many distinct recipients the lists and contacts have (counting stops past
        `stop_after`, which is all a quota check needs); `exclude` are counted elsewhere."""
        if not list_ids and not contact_ids:
            return 0
        total = 0
        after: str | None = None
        while True:
            page = await self._page(account_id, list_ids, contact_ids, after, 5000)
            total += sum(1 for c in page.items if c.email.lower() not in exclude)
            if page.next_cursor is None or total > stop_after:
                return total
            after = page.next_cursor


@dataclass(frozen=True)
class KeyOwner:
    account_id: uuid.UUID
    scope: Literal["send", "full"]


class _KeyAnswer(BaseModel):
    account_id: uuid.UUID
    scope: Literal["send", "full"]


class AuthClient:
    """`POST /internal/api-keys/verify` of the auth service, with a short-lived cache, and
    `GET /internal/users/{id}`."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        headers: dict[str, str],
        cache_seconds: float,
    ) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + "/internal/api-keys/verify"
        self._users_url = base_url.rstrip("/") + "/internal/users/"
        self._headers = headers
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, KeyOwner | None]] = {}

    async def verify_api_key(self, api_key: str) -> KeyOwner | None:
        """The account an API key belongs to, None if auth does not know it (or Unavailable)."""
        now = time.monotonic()
        cached = self._cache.get(api_key)
        if cached is not None and cached[0] > now:
            return cached[1]
        response = await _post(self._http, self._url, {"api_key": api_key}, self._headers)
        if response.status_code == 404:
            owner = None
        elif response.status_code >= 400:
            raise Unavailable(f"auth: HTTP {response.status_code}")
        else:
            try:
                answer = _KeyAnswer.model_validate_json(response.content)
            except ValidationError:
                raise Unavailable("auth: unreadable answer") from None
            owner = KeyOwner(account_id=answer.account_id, scope=answer.scope)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[api_key] = (now + self._cache_seconds, owner)
        return owner

    async def user(self, user_id: uuid.UUID) -> UserChanged | None:
        """The user's current state (the fields of `user.changed`), None if auth does not know
        them (or Unavailable). Not cached: it is asked when campaign's copy may be behind."""
        url = f"{self._users_url}{user_id}"
        response = await _get(self._http, url, self._headers)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise Unavailable(f"auth: HTTP {response.status_code}")
        try:
            return UserChanged.model_validate_json(response.content)
        except ValidationError:
            raise Unavailable("auth: unreadable answer") from None
