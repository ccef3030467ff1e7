"""Builds the auth service's app: its routes, event handlers and workers."""

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from auth import flows
from auth.api import router
from auth.config import Settings
from auth.handlers import HANDLERS
from auth.tokens import SigningKey
from herald.service import Runtime, Worker, create_service_app


def _signing_and_bootstrap(settings: Settings) -> Worker:
    """Loads the signing key, then makes sure the configured administrator exists."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        key = SigningKey.from_pem(settings.jwt_private_key.get_secret_value())
        runtime.extras["signing_key"] = key
        await flows.bootstrap_admin(flows.Auth(pool=runtime.db, settings=settings, key=key))
        yield

    return worker


def create_app(settings: Settings | None = None) -> FastAPI:
    """The auth service's ASGI app."""
    settings = settings or Settings()
    return create_service_app(
        settings,
        title="Herald auth",
        description="Identities: sign-up, login, MFA, sessions, API keys and administrators.",
        router=router,
        handlers=HANDLERS,
        workers=(_signing_and_bootstrap(settings),),
    )
