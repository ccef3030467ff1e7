"""Liveness and readiness: `/healthz` says the process answers, `/readyz` that it can work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from herald.metrics import metrics_response

Check = Callable[[], Awaitable[bool]]


async def _run_check(check: Check, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            return await check()
    except Exception:
        return False


async def run_checks(checks: Mapping[str, Check], timeout: float = 2.0) -> dict[str, bool]:
    """Run every check concurrently, each bounded by `timeout`."""
    results = await asyncio.gather(*(_run_check(c, timeout) for c in checks.values()))
    return dict(zip(checks, results, strict=True))


def health_router(*, service: str, version: str) -> APIRouter:
    """The operational endpoints every service serves; checks come from `app.state.checks`."""
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service, "version": version}

    @router.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        checks: Mapping[str, Check] = getattr(request.app.state, "checks", {})
        results = await run_checks(checks)
        ready = all(results.values())
        body = {
            "status": "ready" if ready else "not_ready",
            "service": service,
            "version": version,
            "checks": {name: "ok" if ok else "failing" for name, ok in results.items()},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/metrics")
    async def metrics() -> object:
        return metrics_response()

    return router
