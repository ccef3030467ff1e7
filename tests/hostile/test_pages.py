"""Every HTML page the platform serves has a Content-Security-Policy and escapes what it shows:
the API documents, the pages mailed links open (unsubscribe, password reset, confirmation), and
the SMTP sink's web view of mail full of markup."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from urllib.parse import quote, urlparse

import httpx

from herald.devinfra.stack import Stack
from herald.links import LinkSigner, UnsubscribeToken
from tests.hostile.conftest import Owner, sender_known

XSS = "<script>alert('herald')</script>"
ATTRIBUTE_XSS = "'\"><img src=x onerror=alert(1)>"
BROWSER = {"Accept": "text/html,application/xhtml+xml"}


def _safe_page(response: httpx.Response, *payloads: str) -> list[str]:
    """What is wrong with an HTML answer: no CSP, or a payload shown as markup."""
    problems: list[str] = []
    where = f"{response.request.method} {response.request.url.path}"
    if not response.headers.get("content-type", "").startswith("text/html"):
        return problems
    policy = response.headers.get("content-security-policy", "")
    if "default-src" not in policy:
        problems.append(f"{where}: no Content-Security-Policy with a default-src ({policy!r})")
    if "script-src" in policy and "'unsafe-inline'" in policy.split("script-src")[1].split(";")[0]:
        problems.append(f"{where}: the CSP allows inline scripts")
    for payload in payloads:
        if payload in response.text:
            problems.append(f"{where}: shows {payload!r} unescaped")
    if response.headers.get("x-content-type-options") != "nosniff":
        problems.append(f"{where}: no X-Content-Type-Options: nosniff")
    return problems


async def test_documentation_pages_have_a_csp(gateway: httpx.AsyncClient):
    problems = []
    for path in ("/docs", "/redoc"):
        response = await gateway.get(path, headers=BROWSER)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        problems += _safe_page(response)
    assert not problems, "\n".join(problems)


async def test_pages_opened_from_mailed_links_escape_what_they_are_given(
    gateway: httpx.AsyncClient, platform: Stack, owner: Owner
):
    signer = LinkSigner.from_spec(platform.secrets["LINK_SIGNING_KEYS"])
    # An address that is valid to the token's signer and full of markup: the page shows it.
    hostile = f'"{XSS}"@example.com'
    token = signer.sign("unsubscribe", UnsubscribeToken(a=uuid.UUID(owner.user_id), r=hostile))
    problems = []
    pages = [
        f"/unsubscribe/{token}",
        f"/unsubscribe/{quote(XSS, safe='')}",
        f"/unsubscribe/{quote(ATTRIBUTE_XSS, safe='')}",
        f"/password/reset?token={quote(ATTRIBUTE_XSS, safe='')}",
        f"/password/reset?token={quote(XSS, safe='')}",
        f"/signup/confirm?token={quote(XSS, safe='')}",
        f"/t/c/{quote(XSS, safe='')}",
        f"/t/o/{quote(XSS, safe='')}",
        f"/{quote(XSS, safe='')}",
    ]
    served_html = 0
    for page in pages:
        response = await gateway.get(page, headers=BROWSER)
        assert response.status_code < 500, (page, response.text)
        served_html += response.headers.get("content-type", "").startswith("text/html")
        problems += _safe_page(response, XSS, ATTRIBUTE_XSS)
    # The signed token opens the real page, which shows the (escaped) address.
    unsubscribe = await gateway.get(f"/unsubscribe/{token}", headers=BROWSER)
    assert unsubscribe.status_code == 200
    assert "&lt;script&gt;" in unsubscribe.text
    # After unsubscribing, the confirmation shows the address too.
    done = await gateway.post(
        f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}, headers=BROWSER
    )
    assert done.status_code == 200, done.text
    problems += _safe_page(done, XSS)
    assert served_html >= 4
    assert not problems, "\n".join(problems)


async def test_mail_full_of_markup_is_shown_escaped_by_every_page(
    gateway: httpx.AsyncClient, sink: httpx.AsyncClient, owner: Owner
):
    """A campaign with markup in every field that reaches the mail, to a contact whose name
    is markup too; then the pages that show it: the sink's views and the unsubscribe page."""
    await sender_known(owner)
    marker = uuid.uuid4().hex[:10]
    address = f"pages-{marker}@example.com"
    contact = await owner.made(
        "POST",
        "/contacts",
        201,
        json={"email": address, "first_name": XSS, "last_name": ATTRIBUTE_XSS},
    )
    the_list = await owner.made("POST", "/lists", 201, json={"name": f"{XSS} {marker}"})
    await owner.made(
        "POST", f"/lists/{the_list['id']}/contacts", 200, json={"contact_ids": [contact["id"]]}
    )
    draft = await owner.made(
        "POST",
        "/compose",
        201,
        json={
            "subject": f"{marker} {XSS} {{{{ contact.first_name }}}}",
            "from_name": ATTRIBUTE_XSS,
            "html": f"<p>{{{{ contact.first_name }}}}</p>{XSS}"
            '<a href="{{ unsubscribe_url }}">Unsubscribe</a>',
            "text": f"{XSS} {{{{ contact.last_name }}}}",
            "list_ids": [the_list["id"]],
        },
    )
    await owner.made("POST", "/send", 202, json={"email_id": draft["id"]})
    deadline = time.monotonic() + 60
    while not (found := (await sink.get("/api/messages", params={"to": address})).json()["items"]):
        assert time.monotonic() < deadline, "the campaign never reached the sink"
        await asyncio.sleep(0.3)
    message_id = found[0]["id"]
    message = (await sink.get(f"/api/messages/{message_id}")).json()
    assert XSS in message["subject"]

    problems = []
    for path in ("/", f"/messages/{message_id}"):
        response = await sink.get(path, headers=BROWSER)
        assert response.status_code == 200, path
        assert marker in response.text
        problems += _safe_page(response, XSS, ATTRIBUTE_XSS)
    alone = await sink.get(f"/api/messages/{message_id}/html", headers=BROWSER)
    assert alone.status_code == 200
    # The mail's own HTML is shown as it is, but sandboxed: no scripts run, nothing loads.
    policy = alone.headers.get("content-security-policy", "")
    assert "sandbox" in policy, policy
    assert "default-src 'none'" in policy, policy

    # The unsubscribe page the mail links to (List-Unsubscribe, as a mail client opens it).
    header = dict((name.lower(), value) for name, value in message["headers"])
    link = re.search(r"<(https?://[^>]+/unsubscribe/[^>]+)>", header["list-unsubscribe"])
    assert link, header["list-unsubscribe"]
    page = await gateway.get(urlparse(link.group(1)).path, headers=BROWSER)
    assert page.status_code == 200
    assert address in page.text
    problems += _safe_page(page, XSS, ATTRIBUTE_XSS)
    assert not problems, "\n".join(problems)
