"""The SMTP sink end to end: mail in over SMTP, out through its HTTP API and pages."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from herald.devinfra.smtp_sink import SmtpSink


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SmtpSink]:
    async with SmtpSink(tmp_path / "sink", smtp_port=0, http_port=0) as running:
        yield running


@pytest.fixture
async def http(sink: SmtpSink) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sink.http_url) as client:
        yield client


def address(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}@example.test"


def compose(*, to: list[str], subject: str, text: str, html: str | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "Herald <sender@herald.test>"
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Message-ID"] = f"<{uuid.uuid4().hex}@herald.test>"
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message.as_bytes(policy=policy.SMTP)


async def send(sink: SmtpSink, raw: bytes, to: list[str], *, smtputf8: bool = False) -> None:
    await aiosmtplib.send(
        raw,
        sender="sender@herald.test",
        recipients=to,
        hostname="127.0.0.1",
        port=sink.smtp_port,
        mail_options=["SMTPUTF8"] if smtputf8 else [],
        timeout=5,
    )


async def test_multipart_message_is_listed_counted_parsed_and_kept_raw(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    rcpt = address("grete")
    subject = "Grüße aus Köln ✓"
    raw = compose(
        to=[rcpt],
        subject=subject,
        text="Hallo Grete, schöne Grüße.",
        html="<p>Hallo <b>Grete</b></p>",
    )
    await send(sink, raw, [rcpt])

    listing = (await http.get("/api/messages", params={"to": rcpt})).json()
    assert listing["total"] == 1
    [meta] = listing["items"]
    assert meta["mail_from"] == "sender@herald.test"
    assert meta["rcpt_tos"] == [rcpt]
    assert meta["subject"] == subject
    assert meta["size"] == len(raw)
    assert meta["message_id"].endswith("@herald.test>")
    assert meta["received_at"].endswith("+00:00")
    assert (await http.get("/api/messages/count", params={"to": rcpt})).json() == {"count": 1}

    parsed = (await http.get(f"/api/messages/{meta['id']}")).json()
    assert parsed["subject"] == subject
    assert parsed["from"] == "Herald <sender@herald.test>"
    assert parsed["to"] == rcpt
    assert parsed["text"] == "Hallo Grete, schöne Grüße.\n"
    assert parsed["html"] == "<p>Hallo <b>Grete</b></p>\n"
    assert ["Subject", subject] in parsed["headers"]

    response = await http.get(f"/api/messages/{meta['id']}/raw")
    assert response.headers["content-type"] == "message/rfc822"
    assert response.content == raw
    assert (sink.directory / "messages" / f"{meta['id']}.eml").read_bytes() == raw


async def test_one_transaction_to_two_recipients_is_one_message(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    first, second = address("ada"), address("bob")
    await send(sink, compose(to=[first, second], subject="Both", text="Hi"), [first, second])

    for rcpt in (first, second):
        [meta] = (await http.get("/api/messages", params={"to": rcpt})).json()["items"]
        assert meta["rcpt_tos"] == [first, second]
    assert (await http.get("/api/messages/count")).json() == {"count": 1}


async def test_list_pages_newest_last_and_after_an_id(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    rcpt = address("pager")
    for n in range(5):
        await send(sink, compose(to=[rcpt], subject=f"n{n}", text="x"), [rcpt])

    newest = (await http.get("/api/messages", params={"limit": 2})).json()
    assert [m["subject"] for m in newest["items"]] == ["n3", "n4"]
    assert newest["total"] == 5
    first_id = newest["items"][0]["id"] - 3
    following = (await http.get("/api/messages", params={"after": first_id, "limit": 2})).json()
    assert [m["subject"] for m in following["items"]] == ["n1", "n2"]
    assert following["total"] == 4
    assert (await http.get("/api/messages", params={"to": "nobody"})).json() == {
        "items": [],
        "total": 0,
    }
    assert (await http.get("/api/messages", params={"limit": 0})).status_code == 422


async def test_dot_lines_and_long_lines_arrive_intact(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    rcpt = address("dots")
    raw = (
        f"From: sender@herald.test\r\nTo: {rcpt}\r\nSubject: dots\r\n\r\n"
        ".leading dot\r\n..two dots\r\n.\r\nends with a dot.\r\n.\r\n" + "x" * 5000 + "\r\n."
    ).encode()
    await send(sink, raw, [rcpt])

    [meta] = (await http.get("/api/messages")).json()["items"]
    assert (await http.get(f"/api/messages/{meta['id']}/raw")).content == raw + b"\r\n"


async def test_data_over_the_size_limit_is_refused_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    rcpt = address("big")
    async with SmtpSink(tmp_path, smtp_port=0, http_port=0, data_size_limit=2000) as sink:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.smtp_port, timeout=5)
        async with client:
            await client.mail("sender@herald.test")
            await client.rcpt(rcpt)
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await client.data(compose(to=[rcpt], subject="big", text="y" * 10_000))
            assert refused.value.code == 552
            await client.sendmail("sender@herald.test", [rcpt], b"Subject: small\r\n\r\nok\r\n")
        async with httpx.AsyncClient(base_url=sink.http_url) as http:
            [meta] = (await http.get("/api/messages")).json()["items"]
            assert meta["subject"] == "small"


async def test_messages_survive_a_restart(tmp_path: Path) -> None:
    rcpt = address("durable")
    raw = compose(to=[rcpt], subject="Still here", text="x")
    async with SmtpSink(tmp_path, smtp_port=0, http_port=0) as sink:
        await send(sink, raw, [rcpt])

    async with (
        SmtpSink(tmp_path, smtp_port=0, http_port=0) as sink,
        httpx.AsyncClient(base_url=sink.http_url) as http,
    ):
        [meta] = (await http.get("/api/messages")).json()["items"]
        assert meta["subject"] == "Still here"
        assert (await http.get(f"/api/messages/{meta['id']}/raw")).content == raw
        await send(sink, raw, [rcpt])
        ids = [m["id"] for m in (await http.get("/api/messages")).json()["items"]]
        assert ids == [meta["id"], meta["id"] + 1]


@pytest.mark.parametrize(("action", "code"), [("defer", 451), ("reject", 550)])
async def test_defer_and_reject_refuse_the_recipient(
    sink: SmtpSink, http: httpx.AsyncClient, action: str, code: int
) -> None:
    rcpt = address("refused")
    rules = [{"match": rcpt, "action": action, "times": None}]
    assert (await http.put("/api/behaviour", json={"rules": rules})).status_code == 200

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(sink, compose(to=[rcpt], subject="No", text="x"), [rcpt])
    [error] = refused.value.recipients
    assert error.code == code
    assert (await http.get("/api/messages/count")).json() == {"count": 0}


async def test_drop_cuts_the_connection_during_data(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    rcpt = address("dropped")
    rules = [{"match": "dropped-", "action": "drop", "times": 1}]
    await http.put("/api/behaviour", json={"rules": rules})

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.smtp_port, timeout=5)
    await client.connect()
    await client.mail("sender@herald.test")
    await client.rcpt(rcpt)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.data(compose(to=[rcpt], subject="Lost", text="x"))

    assert (await http.get("/api/messages/count")).json() == {"count": 0}
    await send(sink, compose(to=[rcpt], subject="Kept", text="x"), [rcpt])
    assert (await http.get("/api/messages/count")).json() == {"count": 1}


async def test_rules_match_in_order_and_count_down(sink: SmtpSink, http: httpx.AsyncClient) -> None:
    bounce, other = address("bounce"), address("other")
    rules = [
        {"match": "BOUNCE-", "action": "reject", "times": None},
        {"match": "*", "action": "defer", "times": 2},
    ]
    await http.put("/api/behaviour", json={"rules": rules})

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(sink, compose(to=[other], subject="1", text="x"), [other])
    current = (await http.get("/api/behaviour")).json()
    assert current["rules"][1] == {"match": "*", "action": "defer", "times": 1}
    assert current["refuse_connections"] is False
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(sink, compose(to=[other], subject="2", text="x"), [other])
    assert [r["match"] for r in (await http.get("/api/behaviour")).json()["rules"]] == ["BOUNCE-"]

    # The refused recipient is left out; the message is stored for the accepted one.
    await send(sink, compose(to=[other, bounce], subject="3", text="x"), [other, bounce])
    [meta] = (await http.get("/api/messages")).json()["items"]
    assert meta["rcpt_tos"] == [other]

    reset = (await http.delete("/api/behaviour")).json()
    assert reset == {"rules": [], "refuse_connections": False}
    await send(sink, compose(to=[bounce], subject="4", text="x"), [bounce])
    assert (await http.get("/api/messages/count")).json() == {"count": 2}


async def test_behaviour_rejects_unknown_actions(http: httpx.AsyncClient) -> None:
    rules = [{"match": "*", "action": "explode"}]
    assert (await http.put("/api/behaviour", json={"rules": rules})).status_code == 422
    assert (await http.get("/api/behaviour")).json()["rules"] == []


async def test_refuse_connections_fails_the_connect(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    await http.put("/api/behaviour", json={"refuse_connections": True})
    rcpt = address("down")
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await send(sink, compose(to=[rcpt], subject="x", text="x"), [rcpt])

    await http.delete("/api/behaviour")
    await send(sink, compose(to=[rcpt], subject="x", text="x"), [rcpt])
    assert (await http.get("/api/messages/count")).json() == {"count": 1}


async def test_smtputf8_addresses_and_raw_utf8_headers(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    rcpt = f"jürgen-{uuid.uuid4().hex[:8]}@bücher.test"
    raw = (
        f"From: sender@herald.test\r\nTo: {rcpt}\r\nSubject: Bücher für dich\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Viel Spaß!\r\n"
    ).encode()
    await send(sink, raw, [rcpt], smtputf8=True)

    [meta] = (await http.get("/api/messages", params={"to": "JÜRGEN"})).json()["items"]
    assert meta["rcpt_tos"] == [rcpt]
    assert meta["subject"] == "Bücher für dich"
    parsed = (await http.get(f"/api/messages/{meta['id']}")).json()
    assert parsed["subject"] == "Bücher für dich"
    assert parsed["text"] == "Viel Spaß!\n"
    assert parsed["html"] is None


async def test_pages_escape_what_they_show_and_forbid_scripts(
    sink: SmtpSink, http: httpx.AsyncClient
) -> None:
    rcpt = address("xss")
    hostile = "<script>alert(1)</script>"
    html_body = f'<p onclick="steal()">Hi</p>{hostile}'
    await send(sink, compose(to=[rcpt], subject=hostile, text=hostile, html=html_body), [rcpt])
    [meta] = (await http.get("/api/messages")).json()["items"]

    for path in ("/", f"/messages/{meta['id']}"):
        page = await http.get(path)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    detail = (await http.get(f"/messages/{meta['id']}")).text
    assert "<iframe sandbox srcdoc=" in detail
    assert 'onclick="' not in detail

    alone = await http.get(f"/api/messages/{meta['id']}/html")
    assert alone.text == html_body + "\n"
    assert "sandbox" in alone.headers["content-security-policy"]
    assert alone.headers["x-content-type-options"] == "nosniff"

    missing = await http.get("/messages/999999")
    assert missing.status_code == 404
    assert "default-src 'none'" in missing.headers["content-security-policy"]


async def test_unknown_message_is_404(http: httpx.AsyncClient) -> None:
    for path in ("/api/messages/424242", "/api/messages/424242/raw"):
        response = await http.get(path)
        assert response.status_code == 404
        assert "detail" in response.json()


async def test_delete_removes_files_and_index(sink: SmtpSink, http: httpx.AsyncClient) -> None:
    rcpt = address("gone")
    for _ in range(3):
        await send(sink, compose(to=[rcpt], subject="x", text="x"), [rcpt])

    assert (await http.delete("/api/messages")).json() == {"deleted": 3}
    assert (await http.get("/api/messages")).json() == {"items": [], "total": 0}
    assert list((sink.directory / "messages").iterdir()) == []
    assert (sink.directory / "index.jsonl").read_text() == ""
    await send(sink, compose(to=[rcpt], subject="after", text="x"), [rcpt])
    assert (await http.get("/api/messages/count")).json() == {"count": 1}


async def test_healthz(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_cli_serves_until_sigterm_and_flushes_the_index(tmp_path: Path) -> None:
    env = {**os.environ, "SINK_DIR": str(tmp_path), "LOG_FORMAT": "text"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "herald.devinfra.smtp_sink",
        "--smtp-port",
        "0",
        "--http-port",
        "0",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        found = None
        while found is None:
            line = await asyncio.wait_for(process.stderr.readline(), timeout=10)
            assert line, "the sink exited before it was listening"
            found = re.search(rb"smtp=127\.0\.0\.1:(\d+) http=http://127\.0\.0\.1:(\d+)", line)
        smtp_port, http_port = int(found[1]), int(found[2])
        rcpt = address("cli")
        await aiosmtplib.send(
            compose(to=[rcpt], subject="via cli", text="x"),
            sender="sender@herald.test",
            recipients=[rcpt],
            hostname="127.0.0.1",
            port=smtp_port,
            timeout=5,
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
            assert (await http.get("/api/messages/count")).json() == {"count": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 0
    [entry] = (tmp_path / "index.jsonl").read_text().splitlines()
    assert json.loads(entry)["rcpt_tos"] == [rcpt]
