"""What the dispatcher's exactly-once accounting takes of a relay, checked on the built-in sink.

A message whose final `.` line the dispatcher wrote before it died is counted as sent and never
sent again (see `dispatcher.delivery`). That holds with a relay that, like Postfix, keeps a
message whose end it received even when the client is gone before the reply. The sink once
dropped such messages (aiosmtpd ends a session the moment its client leaves), which lost a
recipient when the crash test killed the dispatcher at the wrong moment.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from typing import Literal
from urllib.parse import urlsplit

import httpx
import pytest

from herald.devinfra.stack import Stack

Departure = Literal["close", "reset", "before_end"]


def send_and_vanish(host: str, port: int, recipient: str, departure: Departure) -> None:
    """One transaction whose client leaves right after the end of the message (or before it)."""
    with socket.create_connection((host, port), timeout=10) as conn:
        # As the dispatcher's connections do: every write leaves at once.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = conn.makefile("rb")

        def command(line: bytes, expected: int) -> None:
            conn.sendall(line + b"\r\n")
            while (reply := replies.readline())[3:4] == b"-":
                pass
            assert int(reply[:3]) == expected, reply

        assert replies.readline().startswith(b"220")
        command(b"EHLO contract.example", 250)
        command(b"MAIL FROM:<contract@herald.example>", 250)
        command(b"RCPT TO:<" + recipient.encode() + b">", 250)
        command(b"DATA", 354)
        conn.sendall(b"Subject: gone\r\n\r\n" + b"A line of the message.\r\n" * 40)
        if departure == "reset":
            # Closing then sends RST, as a killed process's socket does when a reply it never
            # read is waiting.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if departure != "before_end":
            conn.sendall(b".\r\n")


async def stored(sink: httpx.AsyncClient, tag: str, expected: int) -> int:
    """How many messages to `tag` the sink lists, once `expected` are or a moment passed."""
    for _ in range(30):
        found: int = (await sink.get("/api/messages/count", params={"to": tag})).json()["count"]
        if found >= expected:
            break
        await asyncio.sleep(0.1)
    return found


@pytest.mark.parametrize("departure", ["close", "reset"])
async def test_a_message_whose_end_arrived_is_kept_when_the_client_vanishes(
    infra: Stack, sink: httpx.AsyncClient, departure: Departure
):
    relay = urlsplit(infra.smtp_url)
    assert relay.hostname is not None
    assert relay.port is not None
    tag = f"r{uuid.uuid4().hex[:10]}"
    for n in range(20):
        address = f"{tag}-{n}@contract.example"
        await asyncio.to_thread(send_and_vanish, relay.hostname, relay.port, address, departure)
    assert await stored(sink, tag, 20) == 20


async def test_a_message_cut_off_before_its_end_is_not_kept(infra: Stack, sink: httpx.AsyncClient):
    relay = urlsplit(infra.smtp_url)
    assert relay.hostname is not None
    assert relay.port is not None
    tag = f"r{uuid.uuid4().hex[:10]}"
    for n in range(5):
        address = f"{tag}-{n}@contract.example"
        await asyncio.to_thread(send_and_vanish, relay.hostname, relay.port, address, "before_end")
    await asyncio.sleep(0.5)
    assert await stored(sink, tag, 1) == 0
