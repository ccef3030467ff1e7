"""Unsubscribing through the links a delivered email carries, over the gateway.

A real account sends a list email; the test reads each message from the SMTP sink and uses what
a recipient's mail provider or browser would: the `List-Unsubscribe` URL with an RFC 8058
one-click POST, and the link in the body (a confirmation page, then its form). The next email
to the list must skip exactly those who unsubscribed.
"""

import asyncio
import base64
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import asyncpg
import httpx
import orjson

from tests.gateway.conftest import Account, Requests, new_account

T = TypeVar("T")
HEADER_URL = re.compile(r"<(https?://[^>]+/unsubscribe/[^>]+)>")
BODY_URL = re.compile(r"https?://[^\s\"'<>]+/unsubscribe/[A-Za-z0-9_.-]+")


async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout: float = 60) -> T:
    """The first truthy answer of `check`, polled until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.3)
    return result


async def inbox(sink: httpx.AsyncClient, address: str) -> list[dict[str, Any]]:
    items = (await sink.get("/api/messages", params={"to": address, "limit": 50})).json()["items"]
    return [(await sink.get(f"/api/messages/{m['id']}")).json() for m in items]


async def received(sink: httpx.AsyncClient, address: str, subject: str) -> bool:
    return any(m["subject"] == subject for m in await inbox(sink, address))


async def one_click(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """The POST of RFC 8058 (what the page's form sends too)."""
    return await client.post(
        url,
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


def header(message: dict[str, Any], name: str) -> str:
    [value] = [v for k, v in message["headers"] if k.lower() == name.lower()]
    return str(value)


async def send_to_list(
    gateway: httpx.AsyncClient, account: Account, list_id: str, subject: str
) -> str:
    """Compose an email to the list and send it now; its id."""
    draft = await gateway.post(
        "/compose",
        headers=account.headers,
        json={
            "subject": subject,
            "html": '<p>News.</p><p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>',
            "text": "News.\n\nUnsubscribe: {{ unsubscribe_url }}\n",
            "list_ids": [list_id],
            "from_email": account.email,
        },
    )
    assert draft.status_code == 201, draft.text
    email_id = str(draft.json()["id"])
    sent = await gateway.post("/send", headers=account.headers, json={"email_id": email_id})
    assert sent.status_code == 202, sent.text
    return email_id


async def until_sent(gateway: httpx.AsyncClient, account: Account, email_id: str) -> Any:
    async def sent() -> Any:
        email = (await gateway.get(f"/emails/{email_id}", headers=account.headers)).json()
        return email if email["status"] == "sent" else None

    return await eventually(sent, timeout=90)


def forged(token: str, recipient: str) -> list[str]:
    """Tokens a recipient could make from their own: another address under the same MAC, a
    changed MAC, an unknown key id, a cut-off token."""
    payload, kid, mac = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    other = base64.urlsafe_b64encode(orjson.dumps({**claims, "r": recipient})).rstrip(b"=")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    return [
        f"{other.decode()}.{kid}.{mac}",
        f"{payload}.{kid}.{flipped}",
        f"{payload}.zz9.{mac}",
        f"{payload}.{kid}",
    ]


async def test_unsubscribing_by_the_links_of_a_delivered_email(
    gateway: httpx.AsyncClient,
    sink: httpx.AsyncClient,
    sent_requests: Requests,
    db: asyncpg.Connection,
):
    account = await new_account(gateway, sent_requests)
    # Campaign learns the confirmed sender address from `user.changed`.
    await eventually(
        lambda: db.fetchval(
            "SELECT email_verified FROM campaign.senders WHERE account_id = $1",
            uuid.UUID(account.user_id),
        )
    )
    tag = uuid.uuid4().hex[:8]
    created = await gateway.post("/lists", headers=account.headers, json={"name": f"news {tag}"})
    assert created.status_code == 201, created.text
    list_id = created.json()["id"]
    contacts: dict[str, dict[str, Any]] = {}
    for name in ("ann", "bob", "cy", "dee"):
        response = await gateway.post(
            "/contacts",
            headers=account.headers,
            json={"email": f"{name}-{tag}@example.com", "first_name": name, "list_ids": [list_id]},
        )
        assert response.status_code == 201, response.text
        contacts[name] = response.json()
    address = {name: c["email"] for name, c in contacts.items()}

    first = await send_to_list(gateway, account, list_id, f"First {tag}")
    mail = {}
    for name in contacts:
        (mail[name],) = await eventually(partial(inbox, sink, address[name]))
    await until_sent(gateway, account, first)

    # Every message names its own one-click URL, and the body links to the same place.
    urls = {}
    for name, message in mail.items():
        assert header(message, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        [urls[name]] = HEADER_URL.findall(header(message, "List-Unsubscribe"))
        assert BODY_URL.findall(message["html"]) == [urls[name]]
        assert BODY_URL.findall(message["text"]) == [urls[name]]
    assert len(set(urls.values())) == len(urls)
    # The links point at the public base URL, the gateway, and need no credentials.
    public = str(gateway.base_url.join("/unsubscribe/"))
    assert all(url.startswith(public) for url in urls.values()), (public, urls)

    async with httpx.AsyncClient(timeout=30) as provider:
        # Ann's mail provider: RFC 8058 one-click, straight from the header.
        response = await one_click(provider, urls["ann"])
        assert response.status_code == 200, response.text
        assert response.json() == {"unsubscribed": True, "email": address["ann"]}
        again = await one_click(provider, urls["ann"])
        assert again.json() == {"unsubscribed": True, "email": address["ann"]}

    async with httpx.AsyncClient(timeout=30, headers={"Accept": "text/html"}) as browser:
        # Bob's browser: the body's link asks first (opening it changes nothing) ...
        page = await browser.get(urls["bob"])
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert "Unsubscribe?" in page.text
        assert address["bob"] in page.text
        [action] = re.findall(r"<form method=post action='([^']+)'>", page.text)
        bob = await gateway.get(f"/contacts/{contacts['bob']['id']}", headers=account.headers)
        assert bob.json()["status"] == "active"
        # ... then its form, posted where the page says.
        done = await one_click(browser, str(httpx.URL(urls["bob"]).join(action)))
        assert done.status_code == 200, done.text
        assert "You are unsubscribed" in done.text
        assert address["bob"] in done.text
        revisit = await browser.get(urls["bob"])
        assert "You are unsubscribed" in revisit.text
        assert "<form" not in revisit.text

    # A changed or made-up token is a plain 404 that tells nothing, and unsubscribes no one.
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as stranger:
        cy_token = urls["cy"].rsplit("/", 1)[1]
        for token in forged(cy_token, address["dee"]):
            refused = await one_click(stranger, f"/unsubscribe/{token}")
            assert refused.status_code == 404, (token, refused.text)
            assert refused.json() == {
                "error": {
                    "code": "not_found",
                    "message": "unsubscribe link not found",
                    "details": [],
                }
            }
            page = await stranger.get(f"/unsubscribe/{token}")
            assert page.status_code == 404, (token, page.text)
            assert "This link does not work" in page.text
            for name in ("cy", "dee"):
                assert address[name] not in page.text
                assert address[name] not in refused.text

    for name, status in (
        ("ann", "unsubscribed"),
        ("bob", "unsubscribed"),
        ("cy", "active"),
        ("dee", "active"),
    ):
        response = await gateway.get(f"/contacts/{contacts[name]['id']}", headers=account.headers)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == status, name

    second = await send_to_list(gateway, account, list_id, f"Second {tag}")
    for name in ("cy", "dee"):
        await eventually(partial(received, sink, address[name], f"Second {tag}"))
    email = await until_sent(gateway, account, second)
    assert email["counts"] == {"queued": 2, "sent": 2, "failed": 0}
    for name, copies in (("ann", 0), ("bob", 0), ("cy", 1), ("dee", 1)):
        subjects = [m["subject"] for m in await inbox(sink, address[name])]
        assert subjects.count(f"First {tag}") == 1, name
        assert subjects.count(f"Second {tag}") == copies, name
