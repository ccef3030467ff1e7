"""CR/LF header injection: line breaks in what ends up in a mail header (subject, sender name,
addresses, contact names, tags) are refused with a 422 naming the field, and whatever a template
renders at send time never adds a header or a recipient to an SMTP transaction.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.hostile.conftest import Owner, sender_known
from tests.hostile.openapi_walk import fresh_address

INJECTED = "X-Injected: yes"
BREAKS = ("\r\n", "\n", "\r")


def _evil(value: str, evil_address: str, brk: str) -> str:
    return f"{value}{brk}Bcc: {evil_address}{brk}{INJECTED}"


@pytest.mark.parametrize("brk", BREAKS, ids=["crlf", "lf", "cr"])
async def test_line_breaks_in_header_fields_are_refused_naming_the_field(owner: Owner, brk: str):
    evil = fresh_address()
    draft = owner.ids["email_id"]
    contact = owner.ids["contact_id"]
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/compose", {"subject": _evil("Hi", evil, brk), "text": "t"}, "subject"),
        (
            "POST",
            "/compose",
            {"subject": "Hi", "text": "t", "from_name": _evil("Ann", evil, brk)},
            "from_name",
        ),
        (
            "POST",
            "/compose",
            {"subject": "Hi", "text": "t", "tags": [_evil("t", evil, brk)]},
            "tags.0",
        ),
        (
            "POST",
            "/compose",
            {"subject": "Hi", "text": "t", "to": [_evil(fresh_address(), evil, brk)]},
            "to.0",
        ),
        (
            "POST",
            "/compose",
            {"subject": "Hi", "text": "t", "reply_to": _evil(fresh_address(), evil, brk)},
            "reply_to",
        ),
        ("PATCH", f"/emails/{draft}", {"subject": _evil("Hi", evil, brk)}, "subject"),
        ("PATCH", f"/emails/{draft}", {"from_name": _evil("Ann", evil, brk)}, "from_name"),
        (
            "POST",
            "/send",
            {"to": [fresh_address()], "subject": _evil("Hi", evil, brk), "text": "t"},
            "subject",
        ),
        (
            "POST",
            "/send",
            {
                "to": [fresh_address()],
                "subject": "Hi",
                "text": "t",
                "from_name": _evil("A", evil, brk),
            },
            "from_name",
        ),
        (
            "POST",
            "/contacts",
            {"email": fresh_address(), "first_name": _evil("Ann", evil, brk)},
            "first_name",
        ),
        (
            "POST",
            "/contacts",
            {"email": fresh_address(), "last_name": _evil("Lee", evil, brk)},
            "last_name",
        ),
        ("PATCH", f"/contacts/{contact}", {"first_name": _evil("Ann", evil, brk)}, "first_name"),
        (
            "PUT",
            "/profile",
            {"default_sender_name": _evil("Ann", evil, brk)},
            "default_sender_name",
        ),
        ("PUT", "/profile", {"display_name": _evil("Ann", evil, brk)}, "display_name"),
    ]
    wrong = []
    for method, path, body, field in cases:
        response = await owner.call(method, path, json=body)
        if response.status_code != 422:
            wrong.append(f"{method} {path} {field}: {response.status_code} {response.text[:200]}")
            continue
        fields = [d["field"] for d in response.json()["error"]["details"]]
        if field not in fields:
            wrong.append(f"{method} {path} {field}: 422 names {fields}")
    assert not wrong, "\n".join(wrong)


async def test_a_csv_import_refuses_names_with_line_breaks(owner: Owner):
    evil = fresh_address()
    good = fresh_address()
    content = f'email,first_name\n{fresh_address()},"Ann\r\nBcc: {evil}"\n{good},Bob\n'
    job = await owner.made(
        "POST", "/contacts/import", 202, files={"file": ("c.csv", content.encode(), "text/csv")}
    )
    deadline = time.monotonic() + 30
    while (status := await owner.made("GET", f"/contacts/import/{job['job_id']}", 200))[
        "status"
    ] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert status["status"] == "succeeded", status
    assert status["created"] == 1
    assert [(e["row"], e["field"]) for e in status["errors"]] == [(2, "first_name")]


async def test_no_injected_header_or_recipient_reaches_an_smtp_transaction(
    owner: Owner, sink: httpx.AsyncClient
):
    """Templates render at send time, from variables no request validation sees."""
    evil = fresh_address()
    recipient = f"hdr-{uuid.uuid4().hex[:10]}@example.com"
    await sender_known(owner)
    tag = uuid.uuid4().hex[:8]
    variables = {"v": _evil("Hi", evil, "\r\n"), "w": _evil("Hi", evil, "\n")}
    sent = await owner.made(
        "POST",
        "/send",
        202,
        json={
            "to": [recipient],
            "subject": tag + " {{ v }} {{ w }}",
            "text": "{{ v }}",
            "html": "<p>{{ w }}</p>",
            "template_vars": variables,
        },
    )
    deadline = time.monotonic() + 60
    while True:
        found = (await sink.get("/api/messages", params={"to": recipient})).json()["items"]
        if found:
            break
        email = await owner.made("GET", f"/emails/{sent['id']}", 200)
        assert email["status"] not in ("failed", "cancelled"), email
        assert time.monotonic() < deadline, "the mail never reached the sink"
        await asyncio.sleep(0.3)
    [message] = found
    assert message["rcpt_tos"] == [recipient]
    parsed = (await sink.get(f"/api/messages/{message['id']}")).json()
    names = [name.lower() for name, _ in parsed["headers"]]
    assert "x-injected" not in names
    assert "bcc" not in names
    assert tag in parsed["subject"]
    assert "\n" not in parsed["subject"]
    assert "\r" not in parsed["subject"]
    # Nobody at the injected address got anything, in this or any other transaction.
    assert (await sink.get("/api/messages/count", params={"to": evil})).json()["count"] == 0
