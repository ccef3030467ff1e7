"""Headless Chromium driven over W3C WebDriver (Debian's chromium and chromium-driver), with
httpx: a handful of endpoints, so no Selenium dependency. Pages under test are served locally."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from herald.devinfra.process import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# W3C WebDriver's key for an element reference.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
# An ordinary desktop browser: headless Chromium's own agent names it a machine.
DESKTOP_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0"
    " Safari/537.36"
)


class Browser:
    """One WebDriver session."""

    def __init__(self, http: httpx.AsyncClient, session: str) -> None:
        self._http = http
        self._session = session

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = await self._http.request(
            method, f"/session/{self._session}{path}", json=body if method == "POST" else None
        )
        response.raise_for_status()
        return response.json()["value"]

    async def go(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def url(self) -> str:
        return str(await self._call("GET", "/url"))

    async def click(self, css: str) -> None:
        element = await self._call("POST", "/element", {"using": "css selector", "value": css})
        await self._call("POST", f"/element/{element[ELEMENT]}/click", {})

    async def script(self, source: str) -> Any:
        return await self._call("POST", "/execute/sync", {"script": source, "args": []})


@contextlib.asynccontextmanager
async def chromium(user_agent: str = DESKTOP_AGENT) -> AsyncIterator[Browser]:
    """A headless Chromium session, ended (with its driver and profile) when the block ends."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="herald-chromium-")
    driver = await asyncio.create_subprocess_exec(
        CHROMEDRIVER,
        f"--port={port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/status")).json()["value"]["ready"]:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("chromedriver did not start")
                await asyncio.sleep(0.1)
            # The flags this machine needs: no sandbox as root, no calls to Google's services.
            args = [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                f"--user-agent={user_agent}",
            ]
            capabilities = {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }
            created = await http.post(
                "/session", json={"capabilities": {"alwaysMatch": capabilities}}
            )
            created.raise_for_status()
            session = created.json()["value"]["sessionId"]
            try:
                yield Browser(http, session)
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    await http.delete(f"/session/{session}")
    finally:
        driver.terminate()
        await asyncio.wait_for(driver.wait(), 10)
        shutil.rmtree(profile, ignore_errors=True)


@contextlib.asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` on a free local port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
