"""A TCP gate in front of the SMTP relay that can go down the way a relay does.

The sink's own `refuse_connections` switch turns away new connections only, while the dispatcher
keeps its pooled ones open; a relay that is down drops those too. Put between the dispatcher and
the sink, the gate forwards bytes both ways until `go_down`: then it stops listening (connections
are refused), stops passing on what the dispatcher writes, lets replies already under way reach
it, and closes every connection. `go_up` listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib

from herald.devinfra.process import free_port

# Time for the relay's replies already under way to reach the dispatcher before connections close:
# a message whose end the relay received is then answered, so the dispatcher does not resend it.
DRAIN_SECONDS = 0.5


class RelayGate:
    """Forwards 127.0.0.1:`port` to the relay at `upstream_port` while up."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._sessions: set[asyncio.Task[None]] = set()
        self._down = False

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def go_up(self) -> None:
        """Listen (again) and forward."""
        self._down = False
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )

    async def go_down(self) -> None:
        """Refuse new connections and cut the open ones, after their replies under way."""
        self._down = True
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(DRAIN_SECONDS)
        for writer in list(self._open):
            writer.close()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        await self.go_down()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        self._open.add(client_out)
        relay_out: asyncio.StreamWriter | None = None
        try:
            if self._down:
                return
            relay_in, relay_out = await asyncio.open_connection(self.host, self.upstream_port)
            self._open.add(relay_out)
            await asyncio.gather(
                self._pump(client_in, relay_out, to_relay=True),
                self._pump(relay_in, client_out, to_relay=False),
                return_exceptions=True,
            )
        except OSError:
            pass
        finally:
            for writer in (client_out, relay_out):
                if writer is not None:
                    self._open.discard(writer)
                    writer.close()
            self._sessions.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, to_relay: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if to_relay and self._down:
                    break  # what the dispatcher writes now never reaches the relay
                sink.write(data)
                await sink.drain()
        sink.close()
