"""`python -m gateway`: serve the public API over HTTP, and over HTTPS too when given a certificate.

Both listeners serve one app on one event loop, so they share the rate limits, caches and
connection pools. The plain listener runs the app's lifespan; the TLS one starts once the app is
up. On SIGTERM/SIGINT uvicorn stops the listener that installed its handler last (TLS) and
re-raises the signal, which stops the other: both drain, then the lifespan closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import uvicorn
import uvloop
from fastapi import FastAPI

from gateway.app import create_app
from gateway.config import Settings
from herald.logs import configure_logging


def _config(app: FastAPI, settings: Settings, *, port: int, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=15,
        server_header=False,
        # The edge middleware reads X-Forwarded-For itself, against GATEWAY_TRUSTED_PROXIES.
        proxy_headers=False,
        **options,
    )


async def serve(plain: uvicorn.Server, secure: uvicorn.Server) -> None:
    """Run `plain` (with the lifespan), then `secure` beside it, until both have stopped."""
    first = asyncio.create_task(plain.serve())
    # uvicorn's Server only has a flag to say it is up.
    while not plain.started and not first.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if first.done():
        await first
        return
    second = asyncio.create_task(secure.serve())
    done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
    # Whichever stopped on its own (a failed bind, say), the other follows.
    plain.should_exit = secure.should_exit = True
    await asyncio.gather(first, second)
    for task in done:
        with contextlib.suppress(asyncio.CancelledError):
            task.result()


def main() -> None:
    settings = Settings()
    configure_logging(
        service=settings.service_name, level=settings.log_level, fmt=settings.log_format
    )
    app = create_app(settings)
    plain = uvicorn.Server(_config(app, settings, port=settings.port))
    if not settings.tls_enabled:
        plain.run()
        return
    secure = uvicorn.Server(
        _config(
            app,
            settings,
            port=settings.tls_port,
            lifespan="off",
            ssl_certfile=str(settings.tls_cert_file),
            ssl_keyfile=str(settings.tls_key_file),
        )
    )
    uvloop.run(serve(plain, secure))


if __name__ == "__main__":
    main()
