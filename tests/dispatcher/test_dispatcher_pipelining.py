"""The relay connection's transactions, pipelined (RFC 2920) and not, reply by reply.

Three relays: a scripted one that shows how commands arrive and answers each recipient as told
(it holds back its replies until DATA when it offers PIPELINING, so a client that waits for
the MAIL reply before going on would hang), the development sink (aiosmtpd) with and without
PIPELINING, and Postfix's smtp-sink when it is installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from dispatcher.domain import mailbox, relay_target
from dispatcher.relay import Opening, Relay, RelayConnection, RelayLost, stuff
from herald.devinfra.smtp_sink import SmtpSink

MESSAGE = stuff(b"Subject: hello\r\n\r\n.a line that starts with a dot\r\nbye\r\n")
SENDER = mailbox("sender@herald.example")


@dataclass
class Script:
    """How the scripted relay answers."""

    pipelining: bool = True
    rcpt: dict[str, str] = field(default_factory=dict)  # recipient -> reply (default 250)
    mail: str = "250 2.1.0 Ok"
    data_without_recipients: str = "554 5.5.1 Error: no valid recipients"
    end: str = "250 2.0.0 Ok: queued"
    drip: bool = False  # send replies a byte at a time, the EHLO reply over many lines
    silent_end: bool = False  # never answer the end of a message
    # Offering PIPELINING, answer MAIL and RCPT only once DATA ends the group. (RFC 2920 wants
    # a server to answer whenever its input runs dry; holding back proves the client's group.)
    hold_until_data: bool = True


class ScriptedRelay(asyncio.Protocol):
    """One session of the scripted relay; what it saw is kept on the server object."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.script = server.script
        self.buffer = b""
        self.in_data = False
        self.held: list[bytes] = []
        self.accepted: list[str] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.sessions.append(self)
        self.send(b"220 scripted ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.in_data:
            self.server.commands_per_read.append(data.count(b"\r\n"))
        while True:
            if self.in_data:
                # The CRLF that ended DATA counts: a first line of "." ends an empty message.
                view = b"\r\n" + self.buffer
                end = view.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.server.messages.append((list(self.accepted), view[2 : end + 2]))
                self.buffer = view[end + 5 :]
                self.in_data = False
                self.accepted = []
                if not self.script.silent_end:
                    self.answer(self.script.end)
                continue
            line, crlf, rest = self.buffer.partition(b"\r\n")
            if not crlf:
                return
            self.buffer = rest
            self.command(line.decode())

    def command(self, line: str) -> None:
        self.server.commands.append(line)
        verb = line[:4].upper()
        hold = self.script.pipelining and self.script.hold_until_data
        if verb == "EHLO":
            lines = ["scripted", "SIZE 10240000", "8BITMIME"]
            if self.script.pipelining:
                lines.append("PIPELINING")
            lines += [f"X-FILLER-{n}" for n in range(20 if self.script.drip else 0)]
            self.answer("".join(f"250-{x}\r\n" for x in lines) + "250 HELP")
        elif verb == "MAIL":
            self.accepted = []
            self.answer(self.script.mail, hold=hold)
        elif verb == "RCPT":
            address = line.split("<", 1)[1].split(">", 1)[0]
            answer = self.script.rcpt.get(address, "250 2.1.5 Ok")
            if answer.startswith("250") and self.script.mail.startswith("250"):
                self.accepted.append(address)
            self.answer(answer, hold=hold)
        elif verb == "DATA":
            answer = "354 End data" if self.accepted else self.script.data_without_recipients
            self.in_data = answer.startswith("354")
            self.answer(answer)
        elif verb == "RSET":
            self.accepted = []
            self.answer("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.answer("221 Bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self.answer("502 5.5.2 Error: command not recognized")

    def answer(self, text: str, *, hold: bool = False) -> None:
        self.held.append(text.encode() + b"\r\n")
        if not hold:
            held, self.held = b"".join(self.held), []
            self.send(held)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if self.script.drip:
            for n in range(len(data)):
                self.transport.write(data[n : n + 1])
        else:
            self.transport.write(data)


@dataclass
class ScriptedServer:
    script: Script
    port: int = 0
    sessions: list[ScriptedRelay] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    commands_per_read: list[int] = field(default_factory=list)
    messages: list[tuple[list[str], bytes]] = field(default_factory=list)

    def relay(self, *, pipelining: bool = True) -> Relay:
        target = relay_target(f"smtp://127.0.0.1:{self.port}")
        return Relay(target, timeout=3, pipelining=pipelining)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    state = ScriptedServer(Script())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ScriptedRelay(state), "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for session in state.sessions:
            if session.transport is not None:
                session.transport.close()
        await server.wait_closed()


async def transaction(
    connection: RelayConnection, recipients: list[str], body: bytes = MESSAGE
) -> tuple[Opening, int | None]:
    """One whole transaction: the opening, and the reply to the end (None if not sent)."""
    opening = await connection.begin(SENDER, [mailbox(r) for r in recipients], len(body))
    if not opening.ready:
        await connection.reset()
        return opening, None
    connection.send_body(body)
    assert connection.end()
    return opening, (await connection.finish()).code


def outcomes(opening: Opening, end: int | None, recipients: list[str]) -> dict[str, object]:
    """Each recipient's fate: the code and step that refused it, or the end's code."""
    fates: dict[str, object] = {}
    for n, recipient in enumerate(recipients):
        refusal = opening.refusal(n)
        fates[recipient] = (refusal.code, refusal.stage) if refusal else (end, "end")
    return fates


RECIPIENTS = ["ok-1@x.example", "later@x.example", "never@x.example", "ok-2@x.example"]
PER_RCPT = {"later@x.example": "451 4.7.1 Try later", "never@x.example": "550 5.1.1 No such user"}
EXPECTED = {
    "ok-1@x.example": (250, "end"),
    "later@x.example": (451, "rcpt"),
    "never@x.example": (550, "rcpt"),
    "ok-2@x.example": (250, "end"),
}


@pytest.mark.parametrize("pipelining", [True, False])
async def test_each_recipient_gets_its_own_reply(scripted: ScriptedServer, pipelining: bool):
    scripted.script = Script(pipelining=pipelining, rcpt=dict(PER_RCPT))
    connection = scripted.relay().connection()
    await connection.connect()
    assert connection.pipelining is pipelining
    scripted.commands_per_read.clear()
    opening, end = await transaction(connection, RECIPIENTS)
    assert outcomes(opening, end, RECIPIENTS) == EXPECTED
    [(accepted, body)] = scripted.messages
    assert accepted == ["ok-1@x.example", "ok-2@x.example"]
    assert body == MESSAGE
    # Pipelined: MAIL, the four RCPTs and DATA in one write; else one command per write.
    expected_first = 6 if pipelining else 1
    assert scripted.commands_per_read[0] == expected_first
    assert max(scripted.commands_per_read) == expected_first
    await connection.close()


async def test_pipelining_can_be_turned_off_for_a_relay_that_offers_it(scripted: ScriptedServer):
    scripted.script = Script(hold_until_data=False)
    connection = scripted.relay(pipelining=False).connection()
    await connection.connect()
    assert connection.pipelining is False
    scripted.commands_per_read.clear()
    opening, end = await transaction(connection, ["a@x.example", "b@x.example"])
    assert end == 250
    assert opening.ready
    assert max(scripted.commands_per_read) == 1
    await connection.close()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_no_recipient_accepted_sends_no_message_and_the_connection_goes_on(
    scripted: ScriptedServer, pipelining: bool
):
    scripted.script = Script(
        pipelining=pipelining, rcpt={"a@x.example": "550 5.1.1 No", "b@x.example": "452 4.2.2 Full"}
    )
    connection = scripted.relay().connection()
    await connection.connect()
    opening, end = await transaction(connection, ["a@x.example", "b@x.example"])
    assert end is None
    assert not opening.ready
    assert outcomes(opening, end, ["a@x.example", "b@x.example"]) == {
        "a@x.example": (550, "rcpt"),
        "b@x.example": (452, "rcpt"),
    }
    # Without pipelining DATA is never sent; pipelined it is, and refused.
    assert ("DATA" in scripted.commands) is pipelining
    assert opening.data is None or opening.data.code == 554
    opening, end = await transaction(connection, ["c@x.example"])
    assert end == 250
    assert [m[0] for m in scripted.messages] == [["c@x.example"]]
    await connection.close()


async def test_a_relay_that_takes_data_without_recipients_gets_an_empty_message_ended(
    scripted: ScriptedServer,
):
    # RFC 2920 3.1: should DATA be accepted though no RCPT was, the client ends it with ".".
    scripted.script = Script(
        rcpt={"a@x.example": "550 5.1.1 No"}, data_without_recipients="354 go ahead"
    )
    connection = scripted.relay().connection()
    await connection.connect()
    opening, end = await transaction(connection, ["a@x.example"])
    assert not opening.ready
    assert end is None
    assert opening.refusal(0) == opening.rcpts[0]
    assert opening.rcpts[0] is not None
    assert opening.rcpts[0].code == 550
    assert scripted.messages == [([], b"")]
    opening, end = await transaction(connection, ["b@x.example"])
    assert end == 250
    assert scripted.messages[-1] == (["b@x.example"], MESSAGE)
    await connection.close()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_refused_mail_from_refuses_every_recipient(
    scripted: ScriptedServer, pipelining: bool
):
    scripted.script = Script(pipelining=pipelining, mail="421 4.3.2 Busy, come back later")
    connection = scripted.relay().connection()
    await connection.connect()
    opening, end = await transaction(connection, ["a@x.example", "b@x.example"])
    assert end is None
    assert outcomes(opening, end, ["a@x.example", "b@x.example"]) == {
        "a@x.example": (421, "mail"),
        "b@x.example": (421, "mail"),
    }
    assert scripted.messages == []


async def test_replies_split_anyhow_and_multi_line_are_read_in_order(scripted: ScriptedServer):
    scripted.script = Script(rcpt=dict(PER_RCPT), drip=True)
    connection = scripted.relay().connection()
    await connection.connect()
    assert connection.pipelining
    for _ in range(3):
        opening, end = await transaction(connection, RECIPIENTS)
        assert outcomes(opening, end, RECIPIENTS) == EXPECTED
    assert len(scripted.messages) == 3
    await connection.close()


async def test_a_relay_speaking_on_an_idle_connection_gets_no_transaction(
    scripted: ScriptedServer,
):
    connection = scripted.relay().connection()
    await connection.connect()
    # A relay closing an idle connection says so first (RFC 5321 3.8).
    session = scripted.sessions[-1]
    session.send(b"421 4.4.2 Idle for too long, closing\r\n")
    await asyncio.sleep(0.05)
    with pytest.raises(RelayLost) as lost:
        await transaction(connection, ["a@x.example"])
    assert lost.value.stage == "mail"
    assert not any(c.startswith("MAIL") for c in scripted.commands)
    assert not connection.connected


async def test_a_relay_that_never_answers_times_out(scripted: ScriptedServer):
    scripted.script = Script(silent_end=True)
    connection = Relay(relay_target(f"smtp://127.0.0.1:{scripted.port}"), timeout=0.3).connection()
    await connection.connect()
    opening = await connection.begin(SENDER, [mailbox("a@x.example")], len(MESSAGE))
    assert opening.ready
    connection.send_body(MESSAGE)
    connection.end()
    started = time.monotonic()
    with pytest.raises(RelayLost) as lost:
        await connection.finish()
    assert lost.value.stage == "end"
    assert "timed out" in lost.value.reason
    assert 0.25 < time.monotonic() - started < 3
    assert not connection.connected


# -- the development sink, with and without PIPELINING ---------------------------------------


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
async def dev_sink(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SmtpSink]:
    async with SmtpSink(tmp_path, smtp_port=0, http_port=0, pipelining=request.param) as sink:
        yield sink


async def test_the_development_sink_answers_each_recipient(dev_sink: SmtpSink):
    async with httpx.AsyncClient(base_url=dev_sink.http_url) as http:
        rules = [{"match": "later", "action": "defer"}, {"match": "never", "action": "reject"}]
        (await http.put("/api/behaviour", json={"rules": rules})).raise_for_status()
        relay = Relay(relay_target(f"smtp://127.0.0.1:{dev_sink.smtp_port}"), timeout=5)
        connection = relay.connection()
        await connection.connect()
        for _ in range(2):
            opening, end = await transaction(connection, RECIPIENTS)
            assert outcomes(opening, end, RECIPIENTS) == EXPECTED
        everyone_refused = ["later@x.example", "never@x.example"]
        opening, end = await transaction(connection, everyone_refused)
        assert end is None
        assert [opening.refusal(n).code for n in range(2)] == [451, 550]  # type: ignore[union-attr]
        await connection.close()
        stored = (await http.get("/api/messages")).json()["items"]
    assert (
        sorted(tuple(m["rcpt_tos"]) for m in stored) == [("ok-1@x.example", "ok-2@x.example")] * 2
    )
    assert {m["subject"] for m in stored} == {"hello"}


# -- Postfix's smtp-sink, when installed -----------------------------------------------------


def _smtp_sink_binary() -> str | None:
    for candidate in (shutil.which("smtp-sink"), "/usr/sbin/smtp-sink"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
def postfix_sink(request: pytest.FixtureRequest) -> Iterator[tuple[int, bool]]:
    binary = _smtp_sink_binary()
    # `make test` installs Postfix (Debian's package) when it is missing, as it does Chromium.
    assert binary is not None, "Postfix's smtp-sink is not installed: run `make test-tools`"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [binary, *(["-u", "nobody"] if os.geteuid() == 0 else [])]
    command += [] if request.param else ["-p"]  # -p: do not offer PIPELINING
    process = subprocess.Popen([*command, f"127.0.0.1:{port}", "16"])
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "smtp-sink did not start"
            time.sleep(0.02)
        yield port, request.param
    finally:
        process.terminate()
        process.wait(10)


async def test_postfix_smtp_sink(postfix_sink: tuple[int, bool]):
    port, offers = postfix_sink
    connection = Relay(relay_target(f"smtp://127.0.0.1:{port}"), timeout=5).connection()
    await connection.connect()
    assert connection.pipelining is offers
    for _ in range(20):
        opening, end = await transaction(connection, ["a@x.example", "b@x.example"])
        assert opening.ready
        assert end == 250
    await connection.close()
