"""Builds the tracking service's app: its routes, event handlers and workers."""

from __future__ import annotations

import contextlib
import gc
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI

from herald.service import Runtime, Worker, create_service_app
from tracking import flows, rates, store
from tracking.api import router
from tracking.buffer import ActivityBuffer, Flusher
from tracking.config import Settings
from tracking.handlers import bind
from tracking.hotpath import OPENAPI_PATHS, HotPath, TokenReader, TrackingApp
from tracking.machine import BurstDetector, Classifier, parse_networks
from tracking.metrics import BUFFERED
from tracking.signatures import SnsVerifier, load_sendgrid_key
from tracking.webhooks import Webhooks

# Objects kept alive (made, not yet freed) between the collector's young passes while the hot
# path runs (see `_hot_path`).
_GC_YOUNG = 25_000


def rules_from(settings: Settings) -> flows.Rules:
    """The machine-activity rules the settings describe."""
    return flows.Rules(
        classifier=Classifier(parse_networks(settings.mpp_networks)),
        scanner_click_seconds=settings.scanner_click_seconds,
    )


def _hot_path(settings: Settings, rules: flows.Rules) -> Worker:
    """The pixel and click endpoints' buffer and the worker that flushes it."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        buffer = ActivityBuffer(
            capacity=settings.buffer_max, hold=settings.burst_seconds, batch=settings.flush_batch
        )
        detector = BurstDetector(links=settings.burst_links, seconds=settings.burst_seconds)
        runtime.extras["hotpath"] = HotPath(
            tokens=TokenReader(settings.link_signing_keys.get_secret_value()),
            classifier=rules.classifier,
            buffer=buffer,
            detector=detector,
            forwarded_hops=settings.forwarded_hops,
            full_wait=settings.buffer_full_wait_seconds,
        )
        flusher = Flusher(
            pool=runtime.db,
            buffer=buffer,
            detector=detector,
            rules=rules,
            interval=settings.flush_interval_seconds,
        )
        task = runtime.start_task(flusher.run(), "activity-flusher")

        async def alive() -> bool:
            return not task.done()

        async def backlog() -> dict[str, int]:
            async with runtime.db.acquire() as conn:
                queued = await store.queued_deltas(conn)
            return {"buffered_events": len(buffer), "queued_rollup_changes": queued}

        async def events_per_minute() -> float:
            async with runtime.db.acquire() as conn:
                return float(sum((await rates.events_last_minute(conn)).values()))

        runtime.checks["activity_flusher"] = alive
        runtime.stats["tracking"] = backlog
        runtime.stats["events_per_minute"] = events_per_minute
        # Each answered open leaves a few objects alive until its batch is written (the event,
        # its ids), and the collector counts objects alive, not made: at the default first
        # threshold (700) it passed over the young ones every hundred or so opens, about 6% of
        # the service's CPU under load (perf), 0.2% at 25,000. Garbage is almost all freed by
        # reference counting; only cycles wait longer, and a pass over 25,000 young objects
        # takes about a millisecond. (What start-up built is frozen by `herald.service`.)
        thresholds = gc.get_threshold()
        gc.set_threshold(_GC_YOUNG, *thresholds[1:])
        try:
            yield
        finally:
            flusher.stop()
            with contextlib.suppress(Exception):
                await task
            # Graceful shutdown: everything answered is written before the pool closes.
            await flusher.drain(grace=10)
            BUFFERED.set(len(buffer))
            # As often as before (tests build many apps in one process).
            gc.set_threshold(*thresholds)

    return worker


def _webhooks(settings: Settings, rules: flows.Rules) -> Worker:
    """The SNS verifier (with its HTTP client) and the SendGrid key."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        verify: ssl.SSLContext | bool = True
        if settings.sns_ca_file:
            verify = ssl.create_default_context(cafile=settings.sns_ca_file)
        sendgrid_key = None
        if settings.sendgrid_public_key is not None:
            sendgrid_key = load_sendgrid_key(settings.sendgrid_public_key.get_secret_value())
        topics = frozenset(t.strip() for t in settings.ses_topic_arns.split(",") if t.strip())
        async with httpx.AsyncClient(verify=verify, timeout=10) as http:
            runtime.extras["webhooks"] = Webhooks(
                pool=runtime.db,
                sns=SnsVerifier(http=http, host_pattern=settings.sns_cert_hosts, topics=topics),
                sendgrid_key=sendgrid_key,
                rules=rules,
                unsigned_sendgrid=settings.environment != "production",
            )
            yield

    return worker


def create_app(settings: Settings | None = None) -> FastAPI:
    """The tracking service's ASGI app."""
    settings = settings or Settings()
    rules = rules_from(settings)
    app = create_service_app(
        settings,
        title="Herald tracking",
        description="Delivery status, opens, clicks, bounces, complaints and reports.",
        router=router,
        handlers=bind(rules) if settings.run_consumers else None,
        workers=(_webhooks(settings, rules), _hot_path(settings, rules)),
    )
    # The shared builder makes a plain FastAPI; ours answers the pixel and click links before
    # FastAPI's per-request machinery (see tracking.hotpath). Same object, one method more.
    app.__class__ = TrackingApp
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            base_openapi()["paths"].update(OPENAPI_PATHS)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
    return app
