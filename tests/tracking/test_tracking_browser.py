"""End to end in a real browser: headless Chromium opens a delivered mail, so it fetches the
pixel through the gateway, follows a rewritten link to its original page, and both show up in
`/tracking/{id}` and `/reports`."""

from __future__ import annotations

import html
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from herald.devinfra.stack import Stack
from tests.conftest import TokenMaker
from tests.tracking.tracking_helpers import (
    Account,
    Email,
    click_url,
    counts_when,
    dispatched,
    eventually,
    open_url,
    publish,
    scheduled,
    tracking,
)
from tests.tracking.tracking_webdriver import chromium, serve


def mail_html(platform: Stack, email: Email, recipient: str, pages: str) -> str:
    """The HTML part as the dispatcher sends it: links rewritten, the pixel at the end."""
    base = platform.url("gateway")
    spring = html.escape(base + click_url(platform, email, recipient, 0, f"{pages}/spring?x=1"))
    blog = html.escape(base + click_url(platform, email, recipient, 1, f"{pages}/blog"))
    pixel = html.escape(base + open_url(platform, email, recipient))
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>Spring</title></head><body>"
        "<p>Hello Ada,</p>"
        f'<p><a id="spring" href="{spring}">See the spring collection</a></p>'
        f'<p><a id="blog" href="{blog}">Read the blog</a></p>'
        f'<img id="pixel" src="{pixel}" width="1" height="1" alt="">'
        "</body></html>"
    )


async def test_a_browser_opens_the_mail_and_follows_a_link(
    platform: Stack, gateway: httpx.AsyncClient, mint_token: TokenMaker
):
    email = Email(Account.new(mint_token))
    reader = "ada@example.com"
    await publish(
        platform,
        dispatched(email, reader),
        dispatched(email, "grace@example.com"),
        scheduled(email, "Spring is here", ["browser-test"]),
    )
    await counts_when(gateway, email, lambda c: c["sent"] == 2)
    mail: dict[str, str] = {}

    async def page(request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        if name == "mail":
            return HTMLResponse(mail["html"])
        return HTMLResponse(f"<!doctype html><title>{name}</title><h1>Welcome to {name}</h1>")

    async with serve(Starlette(routes=[Route("/{name}", page)])) as pages:
        mail["html"] = mail_html(platform, email, reader, pages)
        async with chromium() as browser:
            await browser.go(f"{pages}/mail")
            loaded = await eventually(
                lambda: browser.script("return document.getElementById('pixel').naturalWidth"),
                lambda width: width == 1,
            )
            assert loaded == 1, "the browser did not get the pixel"
            counts = await counts_when(gateway, email, lambda c: c["opens"] == 1)
            assert (counts["human_opens"], counts["unique_human_opens"]) == (1, 1)

            await browser.click("#spring")
            landed = await eventually(browser.url, lambda url: "/spring" in url)
            assert landed == f"{pages}/spring?x=1"
            assert await browser.script("return document.title") == "spring"

    counts = await counts_when(gateway, email, lambda c: c["clicks"] == 1)
    assert {k: counts[k] for k in ("clicks", "human_clicks", "unique_clicks", "opens")} == {
        "clicks": 1,
        "human_clicks": 1,
        "unique_clicks": 1,
        "opens": 1,
    }
    body = await tracking(gateway, email)
    assert [(link["link_index"], link["url"], link["human_clicks"]) for link in body["links"]] == [
        (0, f"{pages}/spring?x=1", 1)
    ]
    assert body["rates"]["human_open_rate"] == 0.5
    ada = next(r for r in body["recipients"]["items"] if r["recipient"] == reader)
    assert ada["first_human_open_at"] is not None
    assert ada["first_human_click_at"] is not None

    async def report() -> dict[str, Any]:
        response = await gateway.get(
            "/reports",
            headers=email.account.headers | {"Cache-Control": "no-cache"},
            params={"tag": "browser-test"},
        )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    result = await eventually(report, lambda r: r["totals"]["clicks"] == 1)
    totals = result["totals"]
    assert (totals["sent"], totals["unique_human_opens"], totals["unique_human_clicks"]) == (
        2,
        1,
        1,
    )
    assert result["rates"]["human_click_to_open_rate"] == 1.0
    assert [e["subject"] for e in result["emails"]] == ["Spring is here"]
    assert result["top_links"][0]["url"] == f"{pages}/spring?x=1"
