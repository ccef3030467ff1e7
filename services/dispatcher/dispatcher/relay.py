"""Connections to the SMTP relay: aiosmtplib sets them up, our own reader carries the mail.

aiosmtplib opens the connection (TLS, STARTTLS, AUTH as the URL says) and reads the relay's
extensions. Then `_Replies` takes the transport over: aiosmtplib's protocol reads exactly one
reply per command it wrote and drops whatever else arrives, so it cannot pipeline, and it would
mistake a relay's unsolicited `421` on an idle connection for the answer to our next command.

A transaction (`RelayConnection.begin`) sends MAIL FROM, every RCPT TO and DATA in one write
when the relay offers PIPELINING (RFC 2920), and one at a time when it does not; either way
each recipient gets its own reply. The message then goes out without its final `.` line, which
is written only when the dispatcher says so: that lets it record "handed over" in the same
breath as the relay gets the end of the message (see `delivery.py`). Messages come dot-stuffed
and CRLF-terminated from `stuff`, so aiosmtplib's own pass over every message (line-ending
normalisation, stuffing, size) is not needed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPException

from dispatcher.domain import Mailbox, RelayTarget, Stage

log = logging.getLogger(__name__)

# A reply longer than this (all its lines) is not SMTP; it would otherwise grow without bound.
_MAX_REPLY_BYTES = 64 * 1024
_ACCEPTED_RCPT = (250, 251)


@dataclass(frozen=True, slots=True)
class Reply:
    """What the relay answered, and to which step."""

    code: int
    text: str
    stage: Stage


@dataclass(frozen=True, slots=True)
class Opening:
    """The relay's answers to MAIL, to each RCPT (in order), and to DATA.

    A reply is None for a command that was not sent: without pipelining, RCPT after a refused
    MAIL, and DATA when no recipient was accepted.
    """

    mail: Reply
    rcpts: tuple[Reply | None, ...]
    data: Reply | None

    @property
    def ready(self) -> bool:
        """Whether the relay waits for the message (for the recipients it accepted)."""
        return (
            self.data is not None
            and self.data.code == 354
            and any(self.refusal(n) is None for n in range(len(self.rcpts)))
        )

    def refusal(self, index: int) -> Reply | None:
        """The reply that refuses recipient `index`, or None when the message may go to it."""
        if self.mail.code != 250:
            return self.mail  # the cause, even when the relay also answered RCPT with a 503
        rcpt = self.rcpts[index]
        if rcpt is None:
            return self.mail
        if rcpt.code not in _ACCEPTED_RCPT:
            return rcpt
        if self.data is None:
            return rcpt
        if self.data.code != 354:
            return self.data
        return None


class RelayLost(Exception):
    """The connection failed (refused, dropped, timed out) at `stage`."""

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class Unsupported(Exception):
    """The relay lacks an extension the message needs (SMTPUTF8)."""


def stuff(data: bytes) -> bytes:
    """SMTP dot-stuffing (RFC 5321 4.5.2) of a CRLF message that ends with CRLF."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


class _Replies(asyncio.Protocol):
    """Every reply the relay sends on a connection, parsed and kept in order until read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # the lines so far of a multi-line reply
        self._code = 0
        self._replies: collections.deque[tuple[int, str]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.broken: str | None = None  # why no more replies will come

    @property
    def pending(self) -> int:
        """Replies received and not yet read."""
        return len(self._replies)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            start = end + 1
            code = line[:3]
            if len(code) != 3 or not code.isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._break(f"not an SMTP reply: {line[:80]!r}")
                return
            if self._lines and int(code) != self._code:
                self._break(f"reply lines with different codes: {line[:80]!r}")
                return
            self._code = int(code)
            self._lines.append(line[4:].strip())
            if line[3:4] != b"-":
                text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
                self._replies.append((self._code, text))
                self._lines = []
        del buffer[:start]
        if len(buffer) + sum(map(len, self._lines)) > _MAX_REPLY_BYTES:
            self._break("reply too long")
            return
        if self._replies:
            self._wake()

    def eof_received(self) -> bool:
        self._break("the relay closed the connection")
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(_describe(exc) if exc is not None else "connection lost")

    def pause_writing(self) -> None:
        """Nothing to do: senders watch the transport's buffer (`RelayConnection.unsent`)."""

    def resume_writing(self) -> None:
        """See `pause_writing`."""

    async def next(self, stage: Stage, timeout: float) -> Reply:
        """The next reply, in the order the relay sent them; RelayLost if none comes in time."""
        if not self._replies and self.broken is None:
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, self._expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._replies:
            code, text = self._replies.popleft()
            return Reply(code, text, stage)
        raise RelayLost(stage, self.broken or "timed out waiting for the relay's reply")

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @staticmethod
    def _expire(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_result(None)


class Relay:
    """The relay of `SMTP_URL`: makes connections and checks it is there."""

    def __init__(
        self,
        target: RelayTarget,
        *,
        timeout: float,
        helo_name: str | None = None,
        tls_verify: bool = True,
        pipelining: bool = True,
    ) -> None:
        self.target = target
        self.timeout = timeout
        # Not socket.getfqdn(): it can take seconds of DNS lookups per connection.
        self.helo_name = helo_name or socket.gethostname()
        self.tls_verify = tls_verify
        # Off: never pipeline, even when the relay offers it (for relays that offer it badly).
        self.pipelining = pipelining

    def client(self, timeout: float | None = None) -> aiosmtplib.SMTP:
        target = self.target
        return aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            username=target.username,
            password=target.password,
            use_tls=target.tls == "implicit",
            start_tls=target.tls == "starttls",
            validate_certs=self.tls_verify,
            local_hostname=self.helo_name,
            timeout=timeout or self.timeout,
        )

    def connection(self) -> RelayConnection:
        """A persistent connection (opened on `connect`)."""
        return RelayConnection(self)

    async def reachable(self, timeout: float = 1.5) -> bool:
        """Whether the relay greets us and takes EHLO (and our login) now."""
        client = self.client(timeout)
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            await client.quit()
        except (SMTPException, OSError):
            return False
        finally:
            client.close()
        return True


class RelayConnection:
    """One connection to the relay, carrying one transaction at a time."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._timeout = relay.timeout
        self._smtp = relay.client()
        self._transport: asyncio.WriteTransport | None = None
        self._replies: _Replies | None = None
        # What the relay offered in its EHLO reply.
        self.pipelining = False
        self._size = False
        self._smtputf8 = False
        # Transactions since connecting: a failure on the first command of a reused connection
        # is usually the relay having closed an idle one, and deserves a fresh connection.
        self.transactions = 0

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> None:
        """Open (or reopen) the connection; RelayLost if the relay cannot be reached."""
        self.abort()
        self.transactions = 0
        smtp = self._smtp
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()
        except (SMTPException, OSError) as exc:
            smtp.close()
            raise RelayLost("connect", _describe(exc)) from None
        # uvloop's transports have the methods without being asyncio.WriteTransport subclasses.
        transport = cast(asyncio.WriteTransport | None, smtp.transport)
        if transport is None or transport.is_closing():
            smtp.close()
            raise RelayLost("connect", "connection lost")
        self.pipelining = self._relay.pipelining and smtp.supports_extension("pipelining")
        self._size = smtp.supports_extension("size")
        self._smtputf8 = smtp.supports_extension("smtputf8")
        # From here on the replies are ours (the relay has nothing unread for aiosmtplib: it
        # answered EHLO or AUTH, and waits for us).
        replies = _Replies(asyncio.get_running_loop())
        transport.set_protocol(replies)
        self._transport = transport
        self._replies = replies

    async def begin(self, sender: Mailbox, recipients: Sequence[Mailbox], size: int) -> Opening:
        """MAIL, RCPT for each recipient, and DATA (pipelined if the relay offers it).

        Addresses come checked by `domain.mailbox`, which refuses what could break a command
        line. When the relay accepts DATA though it accepted no recipient, the empty message
        is ended at once (RFC 2920 3.1), so the connection is ready for RSET.
        """
        transport, replies = self._live("mail")
        if replies.pending or replies.broken:
            # The relay spoke or left while the connection sat idle (a 421 before closing):
            # nothing of this message was sent; the caller reconnects.
            self.abort()
            raise RelayLost("mail", replies.broken or "the relay closed the idle connection")
        self.transactions += 1
        mail = b"MAIL FROM:<" + sender.address.encode() + b">"
        if self._size:
            mail += b" SIZE=%d" % size
        if sender.smtputf8 or any(r.smtputf8 for r in recipients):
            if not self._smtputf8:
                raise Unsupported("the relay does not offer SMTPUTF8, which this address needs")
            mail += b" SMTPUTF8"
        rcpt_lines = [b"RCPT TO:<" + r.address.encode() + b">\r\n" for r in recipients]
        timeout = self._timeout
        try:
            if self.pipelining:
                transport.write(b"".join([mail, b"\r\n", *rcpt_lines, b"DATA\r\n"]))
                mail_reply = await replies.next("mail", timeout)
                rcpts: list[Reply | None] = [
                    await replies.next("rcpt", timeout) for _ in rcpt_lines
                ]
                data: Reply | None = await replies.next("data", timeout)
            else:
                transport.write(mail + b"\r\n")
                mail_reply = await replies.next("mail", timeout)
                rcpts = [None] * len(rcpt_lines)
                data = None
                if mail_reply.code == 250:
                    for n, line in enumerate(rcpt_lines):
                        transport.write(line)
                        rcpts[n] = await replies.next("rcpt", timeout)
                    if any(r is not None and r.code in _ACCEPTED_RCPT for r in rcpts):
                        transport.write(b"DATA\r\n")
                        data = await replies.next("data", timeout)
            opening = Opening(mail_reply, tuple(rcpts), data)
            if data is not None and data.code == 354 and not opening.ready:
                transport.write(b".\r\n")
                await replies.next("end", timeout)
        except RelayLost:
            self.abort()
            raise
        except OSError as exc:  # a write on a transport that broke under us
            self.abort()
            raise RelayLost("mail", _describe(exc)) from None
        return opening

    def send_body(self, stuffed: bytes) -> None:
        """Write the (dot-stuffed) message, all but the final `.` line."""
        self._live("data")[0].write(stuffed)

    def end(self) -> bool:
        """Write the line that ends the message: from here on the relay may accept it.

        True when everything written so far is with the operating system, which delivers it
        even if this process dies; False when some still waits in our own buffer.
        """
        self._live("end")[0].write(b".\r\n")
        return self.unsent() == 0

    def unsent(self) -> int:
        """Bytes written but still in this process's buffer (the socket's was full)."""
        size = getattr(self._transport, "get_write_buffer_size", None)
        return int(size()) if size is not None else 0

    async def flushed(self) -> None:
        """Wait until what was written left this process (a big message to a slow relay)."""
        waited = 0.0
        while self.unsent():
            if waited > self._timeout:
                self.abort()
                raise RelayLost("data", "the relay stopped reading the message")
            await asyncio.sleep(0.005)
            waited += 0.005

    async def finish(self) -> Reply:
        """The relay's reply to the end of the message; RelayLost if none comes."""
        _, replies = self._live("end")
        try:
            return await replies.next("end", self._timeout)
        except RelayLost:
            self.abort()
            raise

    async def reset(self) -> None:
        """RSET after a refused transaction; a relay that will not reset is disconnected."""
        try:
            transport, replies = self._live("mail")
            transport.write(b"RSET\r\n")
            reply = await replies.next("mail", self._timeout)
        except (RelayLost, OSError):
            self.abort()
            return
        if reply.code != 250:
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once (abandons a transaction whose end was not sent)."""
        self._transport = self._replies = None
        self._smtp.close()

    async def close(self) -> None:
        """QUIT politely, then close."""
        if self.connected and self._transport is not None and self._replies is not None:
            with contextlib.suppress(RelayLost, OSError):
                self._transport.write(b"QUIT\r\n")
                await self._replies.next("end", min(self._timeout, 2.0))
        self.abort()

    def _live(self, stage: Stage) -> tuple[asyncio.WriteTransport, _Replies]:
        transport, replies = self._transport, self._replies
        if transport is None or replies is None or transport.is_closing():
            raise RelayLost(
                stage, replies.broken if replies and replies.broken else "connection lost"
            )
        return transport, replies


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
