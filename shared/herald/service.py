"""What every service's `create_app` is built from: one lifespan, one middleware stack.

The lifespan opens the database pool, the Kafka producer, the outbox relay and the consumers,
then any workers of the service's own, and closes them in reverse order; what it built is kept
out of the garbage collector's passes while the service runs. Nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from herald import db, logs, migrations, outbox
from herald.consumer import ConsumerRunner, Handlers
from herald.errors import install_error_handlers
from herald.health import Check, health_router
from herald.kafka import broker_reachable, create_producer
from herald.metrics import SERVICE_INFO, MetricsMiddleware
from herald.outbox import OutboxRelay
from herald.security import internal_caller, token_verification
from herald.settings import BaseServiceSettings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The live resources of a running service, kept on `app.state.runtime`."""

    settings: BaseServiceSettings
    pool: asyncpg.Pool | None = None
    producer: AIOKafkaProducer | None = None
    relay: OutboxRelay | None = None
    consumers: list[ConsumerRunner] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    checks: dict[str, Check] = field(default_factory=dict)
    # Service-specific resources opened by its workers (clients, caches), by name.
    extras: dict[str, object] = field(default_factory=dict)
    # Figures a service adds to its /internal/stats (e.g. messages sent in the last minute).
    stats: dict[str, Callable[[], Awaitable[object]]] = field(default_factory=dict)

    @property
    def db(self) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError("this service has no database")
        return self.pool

    def start_task(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Run a background worker for the life of the service; its death fails readiness."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.append(task)
        return task


Worker = Callable[[Runtime], contextlib.AbstractAsyncContextManager[None]]


class RequestIdMiddleware:
    """Takes `X-Request-ID` (or makes one), logs under it, passes it on, and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming[:100] if incoming.isprintable() and incoming else None
        request_id = request_id or logs.new_correlation_id()
        token = logs.correlation_id.set(request_id)

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.correlation_id.reset(token)


def create_service_app(
    settings: BaseServiceSettings,
    *,
    title: str,
    description: str,
    router: APIRouter | None = None,
    handlers: Handlers | None = None,
    uses_database: bool = True,
    verifies_tokens: bool = True,
    workers: tuple[Worker, ...] = (),
    extra_checks: Mapping[str, Callable[[Runtime], Check]] | None = None,
) -> FastAPI:
    """Build a service's FastAPI app around its routes, event handlers and workers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings=settings)
        app.state.runtime = runtime
        app.state.checks = runtime.checks
        SERVICE_INFO.labels(settings.service_name, settings.version).set(1)
        async with contextlib.AsyncExitStack() as stack:
            if uses_database:
                runtime.pool = await db.create_pool(
                    settings.database_url,
                    schema=settings.db_schema,
                    min_size=settings.database_pool_min,
                    max_size=settings.database_pool_max,
                )
                stack.push_async_callback(runtime.pool.close)
                runtime.checks["database"] = _database_check(runtime)
                runtime.checks["migrations"] = _migrations_check(runtime)
                runtime.producer = create_producer(settings)
                await _start_producer(runtime.producer)
                stack.push_async_callback(runtime.producer.stop)
                producer = runtime.producer
                runtime.checks["broker"] = lambda: broker_reachable(producer)
                runtime.relay = OutboxRelay(
                    dsn=settings.database_url,
                    schema=settings.db_schema,
                    producer=producer,
                    retention_hours=settings.outbox_retention_hours,
                )
                relay_task = runtime.start_task(runtime.relay.run(), "outbox-relay")
                stack.push_async_callback(_stop_task, runtime.relay.stop, relay_task)
                runtime.checks["outbox_relay"] = _task_alive(relay_task)
            if handlers:
                runner = ConsumerRunner(
                    settings=settings,
                    pool=runtime.db,
                    producer=_need(runtime.producer),
                    handlers=handlers,
                )
                runtime.consumers.append(runner)
                consumer_task = runtime.start_task(runner.run(), f"consumer-{runner.group_id}")
                stack.push_async_callback(_stop_task, runner.stop, consumer_task)
                runtime.checks["consumer"] = _consumer_check(runner, consumer_task)
            if verifies_tokens:
                runtime.extras["verifier"] = await stack.enter_async_context(
                    token_verification(settings)
                )
            for worker in workers:
                await stack.enter_async_context(worker(runtime))
            for name, make_check in (extra_checks or {}).items():
                runtime.checks[name] = make_check(runtime)
            log.info("service started", extra={"service": settings.service_name})
            # What start-up built (modules, the app and its schemas, pools, clients, models)
            # lives as long as the process: left to the collector, every full pass walks all of
            # it again (some 60 ms a pass in the gateway; 9% of the dispatcher's CPU).
            gc.freeze()
            try:
                yield
            finally:
                log.info("service stopping", extra={"service": settings.service_name})
        # Collectable again (tests build many apps in one process).
        gc.unfreeze()

    app = FastAPI(title=title, description=description, version=settings.version, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(health_router(service=settings.service_name, version=settings.version))
    app.include_router(stats_router(settings))
    if router is not None:
        app.include_router(router)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app


def stats_router(settings: BaseServiceSettings) -> APIRouter:
    """`GET /internal/stats`: what administrators' system view needs from this service."""
    router = APIRouter(include_in_schema=False)

    @router.get("/internal/stats", dependencies=[Depends(internal_caller)])
    async def stats(request: Request) -> dict[str, object]:
        runtime: Runtime = request.app.state.runtime
        body: dict[str, object] = {
            "service": settings.service_name,
            "version": settings.version,
            "consumer_lag": {runner.group_id: dict(runner.lag) for runner in runtime.consumers},
        }
        if runtime.pool is not None:
            async with runtime.pool.acquire() as conn:
                body["outbox_backlog"] = await outbox.backlog(conn)
                body["schema_bytes"] = await conn.fetchval(
                    """SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname = $1 AND c.relkind IN ('r', 'm')""",
                    settings.db_schema,
                )
        for name, provide in runtime.stats.items():
            body[name] = await provide()
        return body

    return router


def _need(producer: AIOKafkaProducer | None) -> AIOKafkaProducer:
    if producer is None:
        raise RuntimeError("consumers need the database and the producer")
    return producer


async def _start_producer(producer: AIOKafkaProducer) -> None:
    # The broker may still be starting (make run starts everything together): wait for it.
    delay = 0.2
    for _ in range(60):
        try:
            await producer.start()
            return
        except Exception as exc:
            log.warning("broker not reachable yet", extra={"error": repr(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    await producer.start()


async def _stop_task(stop: Callable[[], None], task: asyncio.Task[None], grace: float = 10) -> None:
    stop()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=grace)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    except Exception as exc:
        log.warning("worker ended with an error", extra={"error": repr(exc)})


def _database_check(runtime: Runtime) -> Check:
    async def check() -> bool:
        async with runtime.db.acquire(timeout=2) as conn:
            return bool(await conn.fetchval("SELECT true"))

    return check


def _migrations_check(runtime: Runtime) -> Check:
    settings = runtime.settings
    expected = migrations.migrations_for(settings.service_name)

    async def check() -> bool:
        async with runtime.db.acquire(timeout=2) as conn:
            todo = await migrations.pending(conn, schema=settings.db_schema, migrations=expected)
        return not todo

    return check


def _task_alive(task: asyncio.Task[None]) -> Check:
    async def check() -> bool:
        return not task.done()

    return check


def _consumer_check(runner: ConsumerRunner, task: asyncio.Task[None]) -> Check:
    async def check() -> bool:
        return runner.running and not task.done()

    return check
