"""The contacts service as the scheduler sees it: audiences resolved page by page, suppression."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from pydantic import BaseModel, ValidationError

from herald.events.scheduler import Recipient


class ContactsUnavailable(Exception):
    """The contacts service did not answer usefully now; trying again later may work."""


class ContactsRefused(Exception):
    """The contacts service refused the request itself; repeating it will not help."""


class _Page(BaseModel):
    items: list[Recipient]
    next_cursor: str | None = None


class _Suppressed(BaseModel):
    suppressed: list[str]


@dataclass(frozen=True)
class RecipientsPage:
    items: list[Recipient]
    next_cursor: str | None


class ContactsClient:
    """Calls `POST /internal/recipients` and `/internal/suppressed` of the contacts service."""

    def __init__(self, http: httpx.AsyncClient, *, base_url: str, headers: dict[str, str]) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._headers = headers

    async def _post(self, path: str, body: dict[str, object]) -> bytes:
        try:
            response = await self._http.post(
                f"{self._base_url}{path}", json=body, headers=self._headers
            )
        except httpx.HTTPError as exc:
            raise ContactsUnavailable(f"{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500 or response.status_code in (404, 408, 429):
            # 404 too: a contacts service still starting (or older) does not route it yet.
            raise ContactsUnavailable(f"{path}: HTTP {response.status_code}")
        if response.status_code >= 400:
            raise ContactsRefused(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.content

    async def recipients(
        self,
        *,
        account_id: uuid.UUID,
        list_ids: Sequence[uuid.UUID],
        contact_ids: Sequence[uuid.UUID],
        after: str | None,
        limit: int,
    ) -> RecipientsPage:
        """One page of the active, deduplicated members of the lists and contacts given."""
        raw = await self._post(
            "/internal/recipients",
            {
                "account_id": str(account_id),
                "list_ids": [str(i) for i in list_ids],
                "contact_ids": [str(i) for i in contact_ids],
                "after": after,
                "limit": limit,
            },
        )
        try:
            page = _Page.model_validate_json(raw)
        except ValidationError as exc:
            raise ContactsUnavailable(f"/internal/recipients: unreadable answer: {exc}") from None
        return RecipientsPage(items=page.items, next_cursor=page.next_cursor)

    async def suppressed(self, *, account_id: uuid.UUID, emails: Sequence[str]) -> set[str]:
        """Those of `emails` that must not be mailed (lower-cased)."""
        if not emails:
            return set()
        raw = await self._post(
            "/internal/suppressed", {"account_id": str(account_id), "emails": list(emails)}
        )
        try:
            answer = _Suppressed.model_validate_json(raw)
        except ValidationError as exc:
            raise ContactsUnavailable(f"/internal/suppressed: unreadable answer: {exc}") from None
        return {e.lower() for e in answer.suppressed}
