"""Builds the gateway's app: the public API in front of every service."""

from fastapi import FastAPI

from gateway.api import router
from gateway.config import Settings
from gateway.upstreams import upstreams_worker
from herald.service import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway's ASGI app."""
    settings = settings or Settings()
    return create_service_app(
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
        ),
    )
