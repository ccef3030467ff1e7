"""Connections to the SMTP relay, through aiosmtplib, with the end of DATA under our control.

aiosmtplib opens the connection (TLS, STARTTLS, AUTH as the URL says) and speaks the commands.
DATA is split so that the message goes out first and its final `.` only when the dispatcher
says so: that lets it record "handed over" in the same breath as the relay gets the end of the
message (see `delivery.py`). Messages come dot-stuffed and CRLF-terminated from
`stuff`, so aiosmtplib's own pass over every message (line-ending normalisation, stuffing, size)
is not needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponse

from dispatcher.domain import Mailbox, RelayTarget, Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    """What the relay answered, and to which step."""

    code: int
    text: str
    stage: Stage


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


class Relay:
    """The relay of `SMTP_URL`: makes connections and checks it is there."""

    def __init__(
        self,
        target: RelayTarget,
        *,
        timeout: float,
        helo_name: str | None = None,
        tls_verify: bool = True,
    ) -> None:
        self.target = target
        self.timeout = timeout
        # Not socket.getfqdn(): it can take seconds of DNS lookups per connection.
        self.helo_name = helo_name or socket.gethostname()
        self.tls_verify = tls_verify

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
        self._smtp = relay.client()
        # Transactions since connecting: a failure on the first command of a reused connection
        # is usually the relay having closed an idle one, and deserves a fresh connection.
        self.transactions = 0

    @property
    def connected(self) -> bool:
        return self._smtp.is_connected

    async def connect(self) -> None:
        """Open (or reopen) the connection; RelayLost if the relay cannot be reached."""
        self._smtp.close()
        self.transactions = 0
        try:
            await self._smtp.connect()
            if self._smtp.is_ehlo_or_helo_needed:
                await self._smtp.ehlo()
        except (SMTPException, OSError) as exc:
            self._smtp.close()
            raise RelayLost("connect", _describe(exc)) from None

    async def _command(self, stage: Stage, *args: bytes) -> SMTPResponse:
        try:
            return await self._smtp.execute_command(*args)
        except (SMTPException, OSError) as exc:
            self._smtp.close()
            raise RelayLost(stage, _describe(exc)) from None

    async def begin(self, sender: Mailbox, recipient: Mailbox, size: int) -> Reply | None:
        """MAIL, RCPT and DATA: None once the relay waits for the message, else its refusal."""
        self.transactions += 1
        options = []
        if self._smtp.supports_extension("size"):
            options.append(b"SIZE=%d" % size)
        if sender.smtputf8 or recipient.smtputf8:
            if not self._smtp.supports_extension("smtputf8"):
                raise Unsupported("the relay does not offer SMTPUTF8, which this address needs")
            options.append(b"SMTPUTF8")
        reply = await self._command(
            "mail", b"MAIL", b"FROM:<" + sender.address.encode() + b">", *options
        )
        if reply.code != 250:
            return Reply(reply.code, reply.message, "mail")
        reply = await self._command("rcpt", b"RCPT", b"TO:<" + recipient.address.encode() + b">")
        if reply.code not in (250, 251):
            return Reply(reply.code, reply.message, "rcpt")
        reply = await self._command("data", b"DATA")
        if reply.code != 354:
            return Reply(reply.code, reply.message, "data")
        return None

    def send_body(self, stuffed: bytes) -> None:
        """Write the (dot-stuffed) message, all but the final `.` line."""
        self._protocol("data").write(stuffed)

    def expect_reply(self) -> asyncio.Task[SMTPResponse]:
        """Start listening for the reply to the end of the message, before sending it.

        aiosmtplib drops what arrives while no reader waits, so the reader must be in place
        before `end` writes the final line; the task starts on the next turn of the loop,
        which comes before any database round trip that precedes `end`.
        """
        protocol = self._protocol("data")
        return asyncio.ensure_future(protocol.read_response(timeout=self._relay.timeout))

    def end(self) -> bool:
        """Write the line that ends the message: from here on the relay may accept it.

        True when everything written so far is with the operating system, which delivers it
        even if this process dies; False when some still waits in our own buffer.
        """
        self._protocol("end").write(b".\r\n")
        return self.unsent() == 0

    def unsent(self) -> int:
        """Bytes written but still in this process's buffer (the socket's was full)."""
        # uvloop's transports have the method without being asyncio.WriteTransport subclasses.
        size = getattr(self._smtp.transport, "get_write_buffer_size", None)
        return int(size()) if size is not None else 0

    async def flushed(self) -> None:
        """Wait until what was written left this process (a big message to a slow relay)."""
        waited = 0.0
        while self.unsent():
            if waited > self._relay.timeout:
                self._smtp.close()
                raise RelayLost("data", "the relay stopped reading the message")
            await asyncio.sleep(0.005)
            waited += 0.005

    async def finish(self, waiting: asyncio.Task[SMTPResponse]) -> Reply:
        """The relay's reply to the end of the message; RelayLost if none comes."""
        try:
            response = await waiting
        except (SMTPException, OSError) as exc:
            self._smtp.close()
            raise RelayLost("end", _describe(exc)) from None
        return Reply(response.code, response.message, "end")

    async def reset(self) -> None:
        """RSET after a refused transaction; a relay that will not reset is disconnected."""
        try:
            reply = await self._smtp.execute_command(b"RSET")
        except (SMTPException, OSError):
            self._smtp.close()
            return
        if reply.code != 250:
            self._smtp.close()

    def abort(self) -> None:
        """Drop the connection at once (abandons a transaction whose end was not sent)."""
        self._smtp.close()

    async def close(self) -> None:
        """QUIT politely, then close."""
        if self._smtp.is_connected:
            with contextlib.suppress(SMTPException, OSError):
                await asyncio.wait_for(self._smtp.quit(), timeout=2)
        self._smtp.close()

    def _protocol(self, stage: Stage) -> aiosmtplib.protocol.SMTPProtocol:
        protocol = self._smtp.protocol
        if protocol is None or not protocol.is_connected:
            raise RelayLost(stage, "connection lost")
        return protocol


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
