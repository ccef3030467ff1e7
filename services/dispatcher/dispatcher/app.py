"""Builds the dispatcher service's app: its routes, event handlers and the delivery engine."""

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from dispatcher import activity, store
from dispatcher.api import router
from dispatcher.config import Settings
from dispatcher.delivery import Engine
from dispatcher.handlers import HANDLERS
from herald.service import Runtime, Worker, create_service_app


def _delivery(settings: Settings) -> Worker:
    """Runs the delivery engine; on shutdown it finishes the SMTP transactions under way."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        engine = Engine(pool=runtime.db, settings=settings)
        await engine.start()
        runtime.extras["engine"] = engine

        async def engine_running() -> bool:
            return engine.running

        async def unfinished() -> dict[str, object]:
            async with runtime.db.acquire() as conn:
                return {"unfinished": await store.state_counts(conn)}

        async def messages() -> dict[str, object]:
            async with runtime.db.acquire() as conn:
                return await activity.recent_outcomes(conn)

        runtime.checks["smtp_relay"] = engine.relay_ready
        runtime.checks["delivery"] = engine_running
        runtime.stats["delivery"] = unfinished
        runtime.stats["messages"] = messages
        try:
            yield
        finally:
            await engine.stop()

    return worker


def create_app(settings: Settings | None = None) -> FastAPI:
    """The dispatcher service's ASGI app."""
    settings = settings or Settings()
    return create_service_app(
        settings,
        title="Herald dispatcher",
        description="Renders, signs and delivers each recipient's message over SMTP.",
        router=router,
        handlers=HANDLERS,
        workers=(_delivery(settings),),
    )
