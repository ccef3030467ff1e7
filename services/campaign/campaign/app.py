"""Builds the campaign service's app: its routes, event handlers and workers."""

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from campaign.api import router
from campaign.clients import AuthClient, ContactsClient
from campaign.config import Settings
from campaign.emails import Campaign
from campaign.handlers import HANDLERS, REQUEST_HANDLERS
from campaign.operators import status_gauge
from campaign.requests import RequestsConsumer
from herald.security import internal_headers
from herald.service import Runtime, Worker, create_service_app


def _campaign(settings: Settings) -> Worker:
    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        timeout = httpx.Timeout(settings.http_timeout_seconds, connect=5)
        async with httpx.AsyncClient(timeout=timeout) as http:
            headers = internal_headers(settings)
            auth = AuthClient(
                http,
                base_url=settings.auth_url,
                headers=headers,
                cache_seconds=settings.api_key_cache_seconds,
            )
            runtime.extras["campaign"] = Campaign(
                pool=runtime.db,
                contacts=ContactsClient(http, base_url=settings.contacts_url, headers=headers),
                auth=auth,
                settings=settings,
            )
            producer = runtime.producer
            assert producer is not None
            (handler,) = REQUEST_HANDLERS.values()
            consumer = RequestsConsumer(
                settings=settings,
                pool=runtime.db,
                producer=producer,
                auth=auth,
                handler=functools.partial(handler[0], settings=settings),
            )
            runtime.consumers.append(consumer)
            task = runtime.start_task(consumer.run(), f"consumer-{consumer.group_id}")

            async def alive() -> bool:
                return consumer.running and not task.done()

            runtime.checks["requests_consumer"] = alive
            try:
                yield
            finally:
                consumer.stop()
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout=10)
                except TimeoutError:
                    task.cancel()

    return worker


def create_app(settings: Settings | None = None) -> FastAPI:
    """The campaign service's ASGI app."""
    settings = settings or Settings()
    return create_service_app(
        settings,
        title="Herald campaign",
        description="Emails: drafts, content, audience, status; send requests from other systems.",
        router=router,
        handlers=HANDLERS,
        workers=(_campaign(settings), status_gauge(interval=settings.status_gauge_seconds)),
    )
