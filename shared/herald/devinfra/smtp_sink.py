"""A local SMTP sink for development and tests: accepts mail, keeps it on disk, shows it over HTTP.

Run it as its own process (`python -m herald.devinfra.smtp_sink`, see `main`) or in-process
through `SmtpSink`. The SMTP side (aiosmtpd) and the HTTP side (FastAPI under uvicorn) share one
event loop. Every message is written to `<dir>/messages/<id>.eml` and described by one line of
`<dir>/index.jsonl`, which is loaded again on start, so mail survives restarts.

Tests steer the sink over HTTP (`PUT /api/behaviour`) to behave like a relay that defers, rejects
or drops mail, or that is down, so the dispatcher's retry and failure paths can be exercised.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import os
import re
import signal
import socket
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from html import escape
from pathlib import Path
from types import TracebackType
from typing import IO, Annotated, Literal

import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

# pydantic accepts only typing_extensions' TypedDict as a model on Python < 3.12.
from typing_extensions import TypedDict

from herald.logs import configure_logging

__all__ = ["Behaviour", "MessageList", "MessageMeta", "ParsedMessage", "Rule", "SmtpSink", "main"]

log = logging.getLogger(__name__)

DATA_SIZE_LIMIT = 50 * 1024 * 1024
# The index is flushed this often besides on shutdown, so a killed sink loses at most this much.
FLUSH_INTERVAL_SECONDS = 1.0
HTML_PAGE_SIZE = 200

DEFER_REPLY = "451 4.3.0 Try again later"
REJECT_REPLY = "550 5.1.1 Mailbox unavailable"

PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)
# Served mail HTML is hostile until proven otherwise: no scripts, no remote loads, own origin.
MAIL_HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


class MessageMeta(TypedDict):
    """One stored message as the index and the list endpoint describe it."""

    id: int
    received_at: str
    mail_from: str
    rcpt_tos: list[str]
    size: int
    message_id: str | None
    subject: str | None


_ParsedParts = TypedDict(
    "_ParsedParts",
    {
        "headers": list[tuple[str, str]],
        "from": str | None,
        "to": str | None,
        "text": str | None,
        "html": str | None,
    },
)


class ParsedMessage(MessageMeta, _ParsedParts):
    """A stored message with its decoded headers and bodies."""


class MessageList(TypedDict):
    """A page of messages, oldest first, and how many matched in all."""

    items: list[MessageMeta]
    total: int


Action = Literal["accept", "defer", "reject", "drop"]


class Rule(BaseModel):
    """Answer recipients containing `match` (case-insensitive, `*` for all) with `action`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str = Field(min_length=1)
    action: Action
    times: int | None = Field(default=None, ge=1, description="uses left; null means forever")


class Behaviour(BaseModel):
    """How the sink answers: rules checked in order at RCPT TO, and whether it refuses TCP."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: list[Rule] = []
    refuse_connections: bool = False


class _BehaviourControl:
    """The current behaviour; rules with a `times` budget are used up as they match."""

    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self.refuse_connections = False

    def snapshot(self) -> Behaviour:
        return Behaviour(rules=list(self._rules), refuse_connections=self.refuse_connections)

    def replace(self, behaviour: Behaviour) -> None:
        self._rules = list(behaviour.rules)
        self.refuse_connections = behaviour.refuse_connections

    def decide(self, recipient: str) -> Action:
        lowered = recipient.lower()
        for position, rule in enumerate(self._rules):
            if rule.match != "*" and rule.match.lower() not in lowered:
                continue
            if rule.times == 1:
                del self._rules[position]
            elif rule.times is not None:
                self._rules[position] = rule.model_copy(update={"times": rule.times - 1})
            return rule.action
        return "accept"


def _clean(text: str) -> str:
    """`text` made encodable: bytes smuggled through as lone surrogates are re-read as UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _decode_header(value: str) -> str:
    if "=?" not in value:
        return value.strip()
    try:
        return _clean(str(make_header(decode_header(value))))
    except (HeaderParseError, LookupError, UnicodeError):
        return value.strip()


_SUMMARY_FIELDS = (b"message-id", b"subject")


def _summary(raw: bytes) -> tuple[str | None, str | None]:
    """The Message-ID and decoded Subject of `raw`, read from its header section only."""
    # A hand-rolled scan: the stdlib's header parsers cost some 40 µs a message, a tenth of
    # receiving it, and only these two fields are needed at receive time.
    ends = [end for end in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if end >= 0]
    head = raw[: min(ends)] if ends else raw
    found: dict[bytes, bytes] = {}
    current: bytes | None = None
    for line in head.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                found[current] += line
            continue
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        current = name if colon and name in _SUMMARY_FIELDS and name not in found else None
        if current is not None:
            found[current] = value
    message_id, subject = (
        _decode_header(found[name].decode("utf-8", "replace")) if name in found else None
        for name in _SUMMARY_FIELDS
    )
    return message_id or None, subject


def _body(message: EmailMessage, subtype: str) -> str | None:
    """The decoded text/<subtype> body, with line breaks as "\\n" whatever the wire carried."""
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    try:
        content = _clean(str(part.get_content()))
    except (LookupError, UnicodeError):
        # An unknown or lying charset: show the bytes as UTF-8 rather than nothing.
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        content = payload.decode("utf-8", "replace")
    return content.replace("\r\n", "\n")


def _parse(raw: bytes, meta: MessageMeta) -> ParsedMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)

    def header(name: str) -> str | None:
        value = message.get(name)
        return None if value is None else _clean(str(value))

    return {
        **meta,
        "subject": header("Subject"),
        "headers": [(name, _clean(str(value))) for name, value in message.items()],
        "from": header("From"),
        "to": header("To"),
        "text": _body(message, "plain"),
        "html": _body(message, "html"),
    }


@dataclass(slots=True)
class _Entry:
    id: int
    meta: MessageMeta
    # Lower-cased recipients joined, so a `to=` filter is one substring test per message.
    rcpt_key: str


def _entry_id(entry: _Entry) -> int:
    return entry.id


class _MessageStore:
    """Raw messages as files, an append-only JSON-lines index, and that index in memory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._messages_dir = directory / "messages"
        self._index_path = directory / "index.jsonl"
        self._index: IO[str] | None = None
        self._entries: list[_Entry] = []
        self._by_id: dict[int, _Entry] = {}
        self._next_id = 1
        self._deleted_up_to = 0
        self._writer: ThreadPoolExecutor | None = None

    def open(self) -> None:
        self._messages_dir.mkdir(parents=True, exist_ok=True)
        self._entries, self._by_id = [], {}
        text = self._index_path.read_text("utf-8") if self._index_path.exists() else ""
        for line in text.splitlines():
            try:
                self._remember(json.loads(line))
            except (ValueError, KeyError, TypeError):
                # A line cut short by a crash; everything before and after it is still good.
                log.warning("skipping unreadable line in %s: %.80r", self._index_path, line)
        # Files can outlive their index line after a crash; never hand out their ids again.
        on_disk = (int(p.stem) for p in self._messages_dir.glob("*.eml") if p.stem.isdigit())
        last = self._entries[-1].id if self._entries else 0
        self._next_id = max(last, max(on_disk, default=0)) + 1
        self._index = self._index_path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            self._index.write("\n")
        # One thread, so files are written and deleted in the order they were submitted.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smtp-sink-writer")

    def flush(self) -> None:
        if self._index is not None:
            self._index.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._index is not None:
            self._index.close()
            self._index = None

    async def add(self, *, mail_from: str, rcpt_tos: list[str], raw: bytes) -> MessageMeta:
        """Store a received message; it is listed once its file is written."""
        if self._writer is None:
            raise RuntimeError("the store is not open")
        msg_id = self._next_id
        self._next_id += 1
        message_id, subject = _summary(raw)
        meta: MessageMeta = {
            "id": msg_id,
            "received_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "mail_from": _clean(mail_from),
            "rcpt_tos": [_clean(rcpt) for rcpt in rcpt_tos],
            "size": len(raw),
            "message_id": message_id,
            "subject": subject,
        }
        # Creating a file is the slowest step of receiving a message (a millisecond on some
        # virtual disks); in the writer thread it overlaps the loop's work on other sessions.
        # No fsync: a dev sink trades durability for throughput.
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self.path(msg_id).write_bytes, raw
        )
        if self._index is not None and msg_id > self._deleted_up_to:
            self._index.write(json.dumps(meta) + "\n")
            self._remember(meta)
        return meta

    def _remember(self, meta: MessageMeta) -> None:
        entry = _Entry(meta["id"], meta, "\n".join(r.lower() for r in meta["rcpt_tos"]))
        bisect.insort(self._entries, entry, key=_entry_id)
        self._by_id[entry.id] = entry

    def path(self, msg_id: int) -> Path:
        return self._messages_dir / f"{msg_id}.eml"

    def get(self, msg_id: int) -> MessageMeta | None:
        entry = self._by_id.get(msg_id)
        return None if entry is None else entry.meta

    def read_raw(self, msg_id: int) -> bytes | None:
        """The stored bytes, or None if the message is unknown (blocking: run in a thread)."""
        if msg_id not in self._by_id:
            return None
        try:
            return self.path(msg_id).read_bytes()
        except FileNotFoundError:
            return None

    def query(
        self, *, to: str | None, after: int | None, limit: int
    ) -> tuple[list[MessageMeta], int]:
        """Matching messages oldest first, and how many matched before `limit`.

        With `after`, the first `limit` messages following that id, so a poller misses none;
        without, the newest `limit`.
        """
        start = 0 if after is None else bisect.bisect_right(self._entries, after, key=_entry_id)
        entries = self._entries[start:]
        if to:
            needle = to.lower()
            entries = [entry for entry in entries if needle in entry.rcpt_key]
        chosen = entries[:limit] if after is not None else entries[-limit:]
        return [entry.meta for entry in chosen], len(entries)

    def count(self, *, to: str | None) -> int:
        if not to:
            return len(self._entries)
        needle = to.lower()
        return sum(1 for entry in self._entries if needle in entry.rcpt_key)

    async def clear(self) -> int:
        """Delete every message, files and index; returns how many were listed."""
        if self._index is None or self._writer is None:
            raise RuntimeError("the store is not open")
        deleted = len(self._entries)
        self._entries, self._by_id = [], {}
        # Messages still being written are covered too: they will not be listed when done.
        self._deleted_up_to = self._next_id - 1
        self._index.close()
        self._index = self._index_path.open("w", encoding="utf-8")
        # Queued behind those pending writes, so none of their files lands after the sweep.
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self._remove_files, self._deleted_up_to
        )
        return deleted

    def _remove_files(self, up_to: int) -> None:
        # Bounded by id: mail arriving during the sweep is not touched.
        for path in self._messages_dir.glob("*.eml"):
            if path.stem.isdigit() and int(path.stem) <= up_to:
                path.unlink(missing_ok=True)


class _Envelope(Envelope):
    """A transaction's envelope, marked for dropping when a drop rule matched a recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = False


class _Handler:
    """aiosmtpd hooks: apply the behaviour rules at RCPT TO and store mail at DATA."""

    def __init__(
        self, store: _MessageStore, behaviour: _BehaviourControl, *, pipelining: bool = False
    ) -> None:
        self._store = store
        self._behaviour = behaviour
        self._pipelining = pipelining

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd reads commands one line after another, so pipelined ones (RFC 2920) work
        # whether or not they are offered; offering them lets clients test their pipelining.
        session.host_name = hostname  # this hook's duty once it exists
        if self._pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        action = self._behaviour.decide(address)
        if action == "defer":
            return DEFER_REPLY
        if action == "reject":
            return REJECT_REPLY
        if action == "drop" and isinstance(envelope, _Envelope):
            envelope.drop = True
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        meta = await self._store.add(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=envelope.original_content or b"",
        )
        return f"250 2.0.0 OK: queued as {meta['id']}"


_DOT_LINE = b".\r\n"
_END_OF_DATA = b"\r\n" + _DOT_LINE
_PLAIN_ADDRESS = re.compile(r'\s*<([^<>()\[\]\\,;:@\s"]+@[^<>()\[\]\\,;:@\s"]+)>\s*(.*)', re.DOTALL)


class _SinkSMTP(SMTP):
    """aiosmtpd's session with a fast DATA, the drop behaviour, and a registry for stop()."""

    def __init__(
        self, handler: _Handler, live: set[_SinkSMTP], *, hostname: str, data_size_limit: int
    ) -> None:
        self._max_read = data_size_limit + len(_DOT_LINE)
        # aiosmtpd sizes its stream buffer by this; smtp_DATA below reads a message in a few
        # calls instead of one per line, so the buffer has to hold a whole message.
        self.line_length_limit = self._max_read
        super().__init__(
            handler,
            hostname=hostname,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        self._live = live
        # Set while a message comes in and is stored. A client that leaves then (killed after
        # writing the final line, before our reply) is not taken at its word until the message
        # is settled: see `eof_received`.
        self._receiving = False
        self._left: Literal["eof", "lost"] | None = None
        self._lost_error: Exception | None = None

    def _create_envelope(self) -> Envelope:
        return _Envelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._live.discard(self)
        if self._receiving:
            self._left, self._lost_error = "lost", error
            # EOF rather than the error, so the bytes that arrived before it stay readable
            # (a StreamReader with an exception raises it before handing out its buffer).
            self._reader.feed_eof()
            return
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session at once when the client goes away, dropping a message
        # whose final line had arrived but was not yet read or stored. A relay such as Postfix
        # keeps such a message (it notices the client is gone only when replying), and the
        # dispatcher's exactly-once accounting relies on that, so this sink does the same: what
        # is in hand is finished first, and the session ends after.
        if self._receiving:
            self._left = "eof"
            self._reader.feed_eof()
            return True
        return super().eof_received()

    def _end_after_departure(self) -> None:
        """What aiosmtpd does when the client leaves, put off until the message was settled."""
        left, self._left = self._left, None
        if left == "lost":
            super().connection_lost(self._lost_error)
        elif self.transport is not None:
            # Half closed after EOF: closing it brings connection_lost, which ends the session;
            # no transport ends aiosmtpd's command loop now, before it reads past the EOF.
            self.transport.close()
            self.transport = None

    def session_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd runs the full RFC 5322 parser (and builds a class) for each MAIL and RCPT,
        # a quarter of a transaction's cost; plain <local@domain>, nearly all mail, needs none.
        plain = _PLAIN_ADDRESS.fullmatch(arg)
        if plain is None:
            return super()._getaddr(arg)
        return plain[1], plain[2]

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # Same protocol as aiosmtpd's smtp_DATA, whose loop over lines costs more than the rest
        # of the transaction for a message of a hundred lines; this one reads to each ".\r\n".
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._receiving = True
        try:
            status = await self._receive(envelope)
        finally:
            self._receiving = False
        if status is not None and self._left != "lost":
            # Also after an EOF: a client that only shut down its sending side still reads.
            await self.push(status)
        if self._left is not None:
            # The message, if it was whole, is stored; the session ends.
            self._end_after_departure()

    async def _receive(self, envelope: Envelope) -> str | None:
        """Read and store the message; the reply, or None if there is none to give."""
        try:
            content = await self._read_data()
        except asyncio.IncompleteReadError:
            # The client left before the end of the message: there is no message.
            self.envelope = self._create_envelope()
            return None
        if content is None:
            self.envelope = self._create_envelope()
            return "552 Error: Too much mail data"
        if isinstance(envelope, _Envelope) and envelope.drop:
            # A relay dying mid-transaction: the data is in, and no reply ever comes.
            if isinstance(self.transport, asyncio.Transport):
                self.transport.abort()
            return None
        envelope.content = envelope.original_content = content
        status: str = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        return status

    async def _read_data(self) -> bytes | None:
        """The message up to the lone-dot line, dot-unstuffed; None if it was too large."""
        chunks: list[bytes] = []
        size = 0
        # The DATA command's own CRLF counts, so a first line of "." ends an empty message.
        tail = b"\r\n"
        while True:
            try:
                chunk = await self._reader.readuntil(_DOT_LINE)
            except asyncio.LimitOverrunError as overrun:
                chunk = await self._reader.read(overrun.consumed)
            size += len(chunk)
            if size <= self._max_read:
                chunks.append(chunk)
            window = tail + chunk[-len(_END_OF_DATA) :]
            if window.endswith(_END_OF_DATA):
                break
            tail = window[-(len(_END_OF_DATA) - 1) :]
        if size > self._max_read:
            return None
        data = b"".join(chunks)[: -len(_DOT_LINE)]
        if data.startswith(b"."):
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n")


class _Refuser(asyncio.Protocol):
    """Stands in for a relay that is down: the connection closes before any greeting."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn leaving signals to its host; its own handlers would re-raise them on exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _html_response(body: str, *, status_code: int = 200, csp: str = PAGE_CSP) -> HTMLResponse:
    return HTMLResponse(
        body,
        status_code=status_code,
        headers={
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


_STYLE = (
    "body{font:14px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}"
    "td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}"
    "pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}"
    "iframe{width:100%;height:32em;border:1px solid #ccc}"
)


def _page(title: str, content: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{content}</body></html>"
    )


def _index_page(messages: list[MessageMeta], total: int) -> str:
    rows = "".join(
        f"<tr><td>{escape(m['received_at'])}</td><td>{escape(m['mail_from'])}</td>"
        f"<td>{escape(', '.join(m['rcpt_tos']))}</td>"
        f'<td><a href="/messages/{m["id"]}">{escape(m["subject"] or "(no subject)")}</a></td></tr>'
        for m in reversed(messages)
    )
    return _page(
        "SMTP sink",
        f"<h1>SMTP sink</h1><p>{total} messages; the newest {len(messages)} below.</p>"
        f"<table><tr><th>Received</th><th>From</th><th>To</th><th>Subject</th></tr>{rows}"
        "</table>",
    )


def _message_page(message: ParsedMessage) -> str:
    msg_id = message["id"]
    headers = "".join(
        f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>"
        for name, value in message["headers"]
    )
    text = message["text"]
    html = message["html"]
    parts = [
        f"<h1>{escape(message['subject'] or '(no subject)')}</h1>",
        f'<p><a href="/">All messages</a> · <a href="/api/messages/{msg_id}/raw">Raw</a> · '
        f'<a href="/api/messages/{msg_id}">JSON</a></p>',
        f"<table>{headers}</table>",
        "<h2>Text</h2>" + (f"<pre>{escape(text)}</pre>" if text is not None else "<p>None.</p>"),
    ]
    if html is not None:
        parts.append(
            f'<h2>HTML</h2><p><a href="/api/messages/{msg_id}/html">Open alone</a></p>'
            f'<iframe sandbox srcdoc="{escape(html)}"></iframe>'
        )
    return _page(message["subject"] or f"Message {msg_id}", "".join(parts))


def _build_app(store: _MessageStore, behaviour: _BehaviourControl) -> FastAPI:
    # Swagger UI loads scripts from a CDN, which the pages' CSP rightly forbids.
    app = FastAPI(title="Herald SMTP sink", docs_url=None, redoc_url=None)

    async def load(msg_id: int) -> ParsedMessage:
        meta = store.get(msg_id)
        raw = None if meta is None else await asyncio.to_thread(store.read_raw, msg_id)
        if meta is None or raw is None:
            raise HTTPException(404, f"message {msg_id} not found")
        return await asyncio.to_thread(_parse, raw, meta)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness of the sink."""
        return {"status": "ok"}

    @app.get("/api/messages")
    async def list_messages(
        to: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: int | None = None,
    ) -> MessageList:
        """Messages to `to` oldest first: the newest `limit`, or the first `limit` after `after`."""
        items, total = store.query(to=to, after=after, limit=limit)
        return {"items": items, "total": total}

    @app.get("/api/messages/count")
    async def count_messages(to: str | None = None) -> dict[str, int]:
        """How many messages were received, optionally only those to a recipient substring."""
        return {"count": store.count(to=to)}

    @app.get("/api/messages/{msg_id}")
    async def get_message(msg_id: int) -> ParsedMessage:
        """A message with decoded headers, text and HTML bodies."""
        return await load(msg_id)

    @app.get("/api/messages/{msg_id}/raw", response_class=Response)
    async def get_raw(msg_id: int) -> Response:
        """The message exactly as received."""
        raw = await asyncio.to_thread(store.read_raw, msg_id)
        if raw is None:
            raise HTTPException(404, f"message {msg_id} not found")
        return Response(raw, media_type="message/rfc822")

    @app.get("/api/messages/{msg_id}/html", response_class=HTMLResponse)
    async def get_html(msg_id: int) -> HTMLResponse:
        """The message's HTML body, sandboxed by its Content-Security-Policy."""
        html = (await load(msg_id))["html"]
        if html is None:
            raise HTTPException(404, f"message {msg_id} has no HTML body")
        return _html_response(html, csp=MAIL_HTML_CSP)

    @app.delete("/api/messages")
    async def delete_messages() -> dict[str, int]:
        """Delete every stored message, files and index."""
        return {"deleted": await store.clear()}

    @app.get("/api/behaviour")
    async def get_behaviour() -> Behaviour:
        """The rules still in force and whether connections are refused."""
        return behaviour.snapshot()

    @app.put("/api/behaviour")
    async def put_behaviour(body: Behaviour) -> Behaviour:
        """Replace the rules (first match wins at RCPT TO) and the refuse-connections switch."""
        behaviour.replace(body)
        return behaviour.snapshot()

    @app.delete("/api/behaviour")
    async def reset_behaviour() -> Behaviour:
        """Back to accepting everything."""
        behaviour.replace(Behaviour())
        return behaviour.snapshot()

    @app.get("/", response_class=HTMLResponse)
    async def index_page() -> HTMLResponse:
        """The newest messages, for people."""
        messages, total = store.query(to=None, after=None, limit=HTML_PAGE_SIZE)
        return _html_response(_index_page(messages, total))

    @app.get("/messages/{msg_id}", response_class=HTMLResponse)
    async def message_page(msg_id: int) -> HTMLResponse:
        """One message, for people."""
        try:
            message = await load(msg_id)
        except HTTPException:
            return _html_response(_page("Not found", "<h1>No such message</h1>"), status_code=404)
        return _html_response(_message_page(message))

    return app


def _bind_tcp(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    # The explicit IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on connections accepted
    # from such a socket, and without it each keep-alive response stalls ~40 ms on delayed ACKs.
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class SmtpSink:
    """The sink's SMTP and HTTP servers and its store, run on the current event loop.

    Port 0 binds an ephemeral port; read the bound ones from `smtp_port` and `http_port`.
    `pipelining` offers PIPELINING in the EHLO reply (off by default, as before).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        smtp_host: str = "127.0.0.1",
        smtp_port: int = 1025,
        http_host: str = "127.0.0.1",
        http_port: int = 8025,
        data_size_limit: int = DATA_SIZE_LIMIT,
        pipelining: bool = False,
    ) -> None:
        if data_size_limit < 1:
            raise ValueError("data_size_limit must be positive")
        self._store = _MessageStore(Path(directory))
        self._behaviour = _BehaviourControl()
        self._handler = _Handler(self._store, self._behaviour, pipelining=pipelining)
        self._smtp_host, self._smtp_port = smtp_host, smtp_port
        self._http_host, self._http_port = http_host, http_port
        self._data_size_limit = data_size_limit
        # getfqdn() can take seconds of DNS lookups, and aiosmtpd would call it per connection.
        self._hostname = socket.gethostname()
        self._live: set[_SinkSMTP] = set()
        self._smtp_server: asyncio.Server | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._bound_smtp_port: int | None = None
        self._bound_http_port: int | None = None

    @property
    def directory(self) -> Path:
        return self._store.directory

    @property
    def smtp_host(self) -> str:
        return self._smtp_host

    @property
    def smtp_port(self) -> int:
        if self._bound_smtp_port is None:
            raise RuntimeError("the sink is not running")
        return self._bound_smtp_port

    @property
    def http_port(self) -> int:
        if self._bound_http_port is None:
            raise RuntimeError("the sink is not running")
        return self._bound_http_port

    @property
    def http_url(self) -> str:
        host = f"[{self._http_host}]" if ":" in self._http_host else self._http_host
        return f"http://{host}:{self.http_port}"

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load the index and start listening on both ports."""
        if self._smtp_server is not None:
            raise RuntimeError("the sink is already running")
        self._store.open()
        try:
            await self._start_servers()
        except BaseException:
            await self.stop()
            raise

    async def _start_servers(self) -> None:
        loop = asyncio.get_running_loop()
        self._smtp_server = await loop.create_server(
            self._new_connection, self._smtp_host, self._smtp_port
        )
        self._bound_smtp_port = self._smtp_server.sockets[0].getsockname()[1]
        app = _build_app(self._store, self._behaviour)
        self._http = _EmbeddedUvicorn(
            uvicorn.Config(app, lifespan="off", ws="none", log_config=None, access_log=False)
        )
        # Binding here rather than in uvicorn makes the bound port knowable when 0 was asked.
        http_socket = _bind_tcp(self._http_host, self._http_port)
        self._bound_http_port = http_socket.getsockname()[1]
        self._http_task = asyncio.create_task(self._http.serve(sockets=[http_socket]))
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)
        self._flusher = asyncio.create_task(self._flush_periodically())

    def _new_connection(self) -> asyncio.Protocol:
        if self._behaviour.refuse_connections:
            return _Refuser()
        return _SinkSMTP(
            self._handler,
            self._live,
            hostname=self._hostname,
            data_size_limit=self._data_size_limit,
        )

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            self._store.flush()

    async def stop(self) -> None:
        """Stop accepting, close open connections, stop HTTP and flush the index."""
        if self._smtp_server is not None:
            self._smtp_server.close()
        sessions = [task for smtp in self._live if (task := smtp.session_task()) is not None]
        for smtp in list(self._live):
            if smtp.transport is not None:
                smtp.transport.close()
        await asyncio.gather(*sessions, return_exceptions=True)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._smtp_server is not None:
            await self._smtp_server.wait_closed()
        self._store.close()
        self._smtp_server = self._http = self._http_task = self._flusher = None
        self._bound_smtp_port = self._bound_http_port = None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m herald.devinfra.smtp_sink",
        description="A local SMTP sink: accepts all mail, stores it, shows it over HTTP.",
    )
    parser.add_argument("--smtp-host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, default=int(env.get("SINK_SMTP_PORT", "1025")))
    parser.add_argument("--http-host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=int(env.get("SINK_HTTP_PORT", "8025")))
    parser.add_argument("--dir", type=Path, default=Path(env.get("SINK_DIR", ".data/sink")))
    parser.add_argument(
        "--pipelining", action="store_true", help="offer PIPELINING (RFC 2920) in the EHLO reply"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    sink = SmtpSink(
        args.dir,
        smtp_host=args.smtp_host,
        smtp_port=args.smtp_port,
        http_host=args.http_host,
        http_port=args.http_port,
        pipelining=args.pipelining,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await sink.start()
    log.info(
        "listening smtp=%s:%d http=%s dir=%s",
        sink.smtp_host,
        sink.smtp_port,
        sink.http_url,
        sink.directory,
    )
    try:
        await stopping.wait()
    finally:
        await sink.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the sink until SIGINT or SIGTERM."""
    args = _parse_args(argv)
    configure_logging(
        service="smtp-sink",
        level=os.environ.get("LOG_LEVEL", "INFO"),
        fmt=os.environ.get("LOG_FORMAT", "json"),
    )
    # aiosmtpd logs every SMTP command at INFO, which at benchmark rates costs more than the mail.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
