"""Run a service's app with uvicorn: `python -m <service>` calls `serve`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from herald.logs import configure_logging
from herald.settings import BaseServiceSettings

S = TypeVar("S", bound=BaseServiceSettings)


def serve(create_app: Callable[[S], FastAPI], settings: S, *, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then shut the lifespan down gracefully."""
    configure_logging(
        service=settings.service_name, level=settings.log_level, fmt=settings.log_format
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=15,
        server_header=False,
    )
    uvicorn.Server(config).run()
