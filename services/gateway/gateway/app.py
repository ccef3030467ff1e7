"""Builds the gateway's app: the public API in front of every service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware import Middleware

from gateway.api import router
from gateway.cache import ResponseCache
from gateway.config import Settings
from gateway.domain import RateLimiter
from gateway.edge import EdgeMiddleware, JsonCorsMiddleware
from gateway.identity import VerifiedTokens
from gateway.openapi import ApiDocuments
from gateway.upstreams import Upstreams, upstreams_worker
from herald.service import Runtime, Worker, create_service_app

_EXPOSED = [
    "X-Request-ID",
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "ETag",
    "Location",
]


def _edge_state(settings: Settings) -> Worker:
    """The per-account limiter and the read cache, for the life of the gateway."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        runtime.extras["account_limiter"] = RateLimiter(
            rate=settings.rate_limit_account_per_second, burst=settings.rate_limit_account_burst
        )
        runtime.extras["verified_tokens"] = VerifiedTokens()
        runtime.extras["response_cache"] = ResponseCache(
            shared_seconds=settings.jwks_cache_seconds,
            private_seconds=settings.reports_cache_seconds,
        )
        yield

    return worker


def _api_documents(settings: Settings) -> Worker:
    """Keeps the services' OpenAPI documents current in the background."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        upstreams = runtime.extras["upstreams"]
        assert isinstance(upstreams, Upstreams)
        documents = ApiDocuments(
            client=upstreams.client,
            urls=upstreams.urls,
            version=settings.version,
            refresh_seconds=settings.openapi_refresh_seconds,
        )
        runtime.extras["api_documents"] = documents
        stop = asyncio.Event()
        # Not `runtime.start_task`: a refresh loop that ended must not fail readiness.
        task = asyncio.create_task(documents.run(stop), name="openapi-refresh")
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)

    return worker


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway's ASGI app."""
    settings = settings or Settings()
    app = create_service_app(
        settings,
        title="Herald",
        description="The public API of Herald, an open-source email-sending platform.",
        router=router,
        uses_database=False,
        workers=(
            upstreams_worker(
                settings.upstreams(),
                timeout=settings.upstream_timeout,
                api_key_cache_seconds=settings.api_key_cache_seconds,
            ),
            _edge_state(settings),
            _api_documents(settings),
        ),
    )
    # FastAPI's own documentation routes would shadow the merged document and the offline pages.
    defaults = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.router.routes[:] = [
        route
        for route in app.router.routes
        if isinstance(route, APIRoute) or getattr(route, "path", None) not in defaults
    ]
    # Inside the request-id and metrics middleware (appended, not added on top), so that the
    # gateway's own refusals carry a request id and are counted like every answer.
    origins = settings.cors_origin_list()
    if origins:
        app.user_middleware.append(
            Middleware(
                JsonCorsMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "If-None-Match", "X-Request-ID"],
                expose_headers=_EXPOSED,
                max_age=600,
            )
        )
    app.user_middleware.append(
        Middleware(
            EdgeMiddleware,
            ip_limiter=RateLimiter(
                rate=settings.rate_limit_ip_per_second, burst=settings.rate_limit_ip_burst
            ),
            trusted_proxies=settings.trusted_proxy_networks(),
            max_body_bytes=settings.max_body_bytes,
            max_upload_bytes=settings.max_upload_bytes,
            hsts_max_age=settings.hsts_max_age,
        )
    )
    return app
