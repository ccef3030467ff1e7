"""HTTP routes of the dispatcher service: internal only (the gateway forwards none of them)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from dispatcher import store
from dispatcher.schemas import DeliverySummary, MessageRecord
from herald.errors import ERROR_RESPONSES, not_found
from herald.security import internal_caller

router = APIRouter(
    prefix="/internal",
    responses=ERROR_RESPONSES,
    dependencies=[Depends(internal_caller)],
    include_in_schema=False,
)


@router.get("/emails/{email_id}/deliveries", response_model=DeliverySummary)
async def delivery_summary(email_id: uuid.UUID, request: Request) -> Any:
    """How many of an email's messages are queued, being sent, sent, deferred or failed."""
    async with request.app.state.runtime.db.acquire() as conn:
        counts = await store.state_counts(conn, email_id=email_id)
    return {"email_id": email_id, "total": sum(counts.values()), **counts}


@router.get("/messages/{message_id}", response_model=MessageRecord)
async def message_record(message_id: uuid.UUID, request: Request) -> Any:
    """One message by its id (the left part of its Message-ID)."""
    async with request.app.state.runtime.db.acquire() as conn:
        row = await store.message_by_id(conn, message_id=message_id)
    if row is None:
        raise not_found("message")
    return dict(row)
