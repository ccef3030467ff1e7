"""Builds the scheduler service's app: its routes, event handlers and workers."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from herald.health import Check
from herald.security import internal_headers
from herald.service import Runtime, Worker, create_service_app
from scheduler.api import router
from scheduler.config import Settings
from scheduler.contacts import ContactsClient
from scheduler.fanout import FanoutRunner, TimerPoller
from scheduler.handlers import HANDLERS


def _alive(task: asyncio.Task[None]) -> Check:
    async def check() -> bool:
        return not task.done()

    return check


def _timers_and_fanouts(settings: Settings) -> Worker:
    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        timeout = httpx.Timeout(settings.contacts_timeout_seconds, connect=5)
        async with httpx.AsyncClient(timeout=timeout) as http:
            contacts = ContactsClient(
                http, base_url=settings.contacts_url, headers=internal_headers(settings)
            )
            runners = [
                FanoutRunner(
                    pool=runtime.db,
                    contacts=contacts,
                    batch_size=settings.batch_size,
                    lease_seconds=settings.fanout_lease_seconds,
                )
                for _ in range(settings.fanout_concurrency)
            ]

            def wake_runners() -> None:
                for runner in runners:
                    runner.wake.set()

            poller = TimerPoller(
                pool=runtime.db,
                poll_interval=settings.poll_interval_seconds,
                on_fired=wake_runners,
            )
            tasks = [runtime.start_task(poller.run(), "timer-poller")]
            runtime.checks["timer_poller"] = _alive(tasks[0])
            for number, runner in enumerate(runners):
                task = runtime.start_task(runner.run(), f"fanout-{number}")
                tasks.append(task)
                runtime.checks[f"fanout_{number}"] = _alive(task)
            try:
                yield
            finally:
                poller.stop()
                for runner in runners:
                    runner.stop()
                _, unfinished = await asyncio.wait(tasks, timeout=10)
                for task in unfinished:
                    task.cancel()

    return worker


def create_app(settings: Settings | None = None) -> FastAPI:
    """The scheduler service's ASGI app."""
    settings = settings or Settings()
    return create_service_app(
        settings,
        title="Herald scheduler",
        description="Durable timers and the fan-out of an email to per-recipient delivery jobs.",
        router=router,
        handlers=HANDLERS,
        # Nothing of the scheduler is public: no caller tokens to verify.
        verifies_tokens=False,
        workers=(_timers_and_fanouts(settings),),
    )
