"""The whole platform on one machine: embedded infrastructure and every service as a process.

`make run` uses it through `python -m herald.devinfra`; the end-to-end and fault tests use it
too, on their own ports and data directory, so they can kill and restart single services.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

from herald import events, migrations
from herald.devinfra.broker import EmbeddedBroker
from herald.devinfra.postgres import EmbeddedPostgres
from herald.devinfra.process import die_with_parent, free_port
from herald.devinfra.secrets import development_secrets
from herald.kafka import ensure_topics, recreate_misshapen_topics
from herald.settings import SERVICE_PORTS, BaseServiceSettings

SERVICES = list(SERVICE_PORTS)
BACKEND_SERVICES = [s for s in SERVICES if s != "gateway"]


@dataclass
class StackConfig:
    """Where everything lives and listens. Unset URLs mean: start the embedded one."""

    data_dir: Path
    service_ports: dict[str, int] = field(default_factory=lambda: dict(SERVICE_PORTS))
    database_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    smtp_url: str | None = None
    pg_port: int = 55432
    broker_port: int = 9092
    sink_smtp_port: int = 1025
    sink_http_port: int = 8025
    durable: bool = True
    kafka_partitions: int = 6
    env: dict[str, str] = field(default_factory=dict)
    echo_logs: bool = False


class ServiceProcess:
    """One service running as `python -m <module>` (by default its name), its output in
    `log_path`; a replica has a name of its own and its service's module."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        log_path: Path,
        echo: TextIO | None,
        *,
        module: str | None = None,
    ):
        self.name = name
        self.module = module or name
        self.env = dict(env)
        self.log_path = log_path
        self.echo = echo
        self.process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops us in order
            preexec_fn=die_with_parent,
        )
        self._pump = asyncio.create_task(self._copy_output(self.process))

    async def _copy_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        with self.log_path.open("ab") as log:
            async for line in process.stdout:
                log.write(line)
                log.flush()
                if self.echo is not None:
                    self.echo.write(f"{self.name:>10} | {line.decode(errors='replace')}")
                    self.echo.flush()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        """Send `sig` (SIGKILL to crash it), wait for the exit, and reap its output."""
        if self.process is None:
            return
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)
        self.process = None


class Stack:
    """Starts, watches and stops the platform described by a StackConfig."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.postgres: EmbeddedPostgres | None = None
        self.broker: EmbeddedBroker | None = None
        self.sink: ServiceProcess | None = None
        self.services: dict[str, ServiceProcess] = {}
        # Ports of replicas started under names of their own (see `start_service`).
        self.replica_ports: dict[str, int] = {}
        self.database_url = config.database_url or ""
        self.kafka_bootstrap_servers = config.kafka_bootstrap_servers or ""
        self.smtp_url = config.smtp_url or ""
        self.secrets: dict[str, str] = {}

    @property
    def logs_dir(self) -> Path:
        return self.config.data_dir / "logs"

    def url(self, service: str) -> str:
        """The HTTP address of a service, or of a replica by the name it was started under."""
        port = self.replica_ports.get(service) or self.config.service_ports[service]
        return f"http://127.0.0.1:{port}"

    @property
    def sink_url(self) -> str:
        return f"http://127.0.0.1:{self.config.sink_http_port}"

    async def start_infrastructure(self) -> None:
        """Start what is not given by URL: PostgreSQL, the broker, the SMTP sink."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.secrets = development_secrets(cfg.data_dir / "secrets")
        if not cfg.database_url:
            self.postgres = EmbeddedPostgres(
                cfg.data_dir / "pg", port=cfg.pg_port, durable=cfg.durable
            )
            await asyncio.to_thread(self.postgres.start)
            await self.postgres.ensure_database()
            self.database_url = self.postgres.dsn
        if not cfg.kafka_bootstrap_servers:
            self.broker = EmbeddedBroker(
                port=cfg.broker_port, log_path=self.logs_dir / "broker.log"
            )
            await asyncio.to_thread(self.broker.start)
            self.kafka_bootstrap_servers = self.broker.bootstrap_servers
        if not cfg.smtp_url:
            await self.start_sink()
            self.smtp_url = f"smtp://127.0.0.1:{cfg.sink_smtp_port}"

    async def start_sink(self) -> None:
        cfg = self.config
        env = self._base_env() | {
            "SINK_SMTP_PORT": str(cfg.sink_smtp_port),
            "SINK_HTTP_PORT": str(cfg.sink_http_port),
            "SINK_DIR": str(cfg.data_dir / "sink"),
        }
        self.sink = ServiceProcess(
            "herald.devinfra.smtp_sink", env, self.logs_dir / "smtp-sink.log", self._echo()
        )
        await self.sink.start()
        await self._wait_http(f"{self.sink_url}/healthz", "SMTP sink", 30)

    async def restart_broker(self) -> None:
        """Stop and start the embedded broker (losing all it held), then recreate the topics."""
        await self.stop_broker()
        await self.start_broker()

    async def stop_broker(self, *, kill: bool = False) -> None:
        """Stop the embedded broker; everything it held is lost (it keeps it in memory only)."""
        assert self.broker is not None, "only the embedded broker can be stopped"
        await asyncio.to_thread(self.broker.stop, kill=kill)

    async def start_broker(self) -> None:
        """Start the embedded broker again, on its port, and create the topics anew.

        Services reconnecting at the same moment often get there first: the broker then creates
        a topic they name with its own partition count (4), and such topics are created again
        with the stack's. Relays publish again what was on them, including what went to a
        partition the topic no longer has.
        """
        assert self.broker is not None, "only the embedded broker can be started"
        await asyncio.to_thread(self.broker.start)
        await self.create_topics()

    async def stop_postgres(self, mode: str = "fast") -> None:
        """Stop the embedded PostgreSQL (`fast`: sessions are cut; `immediate`: a crash)."""
        assert self.postgres is not None, "only the embedded PostgreSQL can be stopped"
        await asyncio.to_thread(self.postgres.stop, mode)

    async def start_postgres(self) -> None:
        """Start the embedded PostgreSQL again on its data directory and port."""
        assert self.postgres is not None, "only the embedded PostgreSQL can be started"
        await asyncio.to_thread(self.postgres.start)

    async def create_topics(self) -> None:
        settings = BaseServiceSettings(
            kafka_bootstrap_servers=self.kafka_bootstrap_servers,
            kafka_partitions=self.config.kafka_partitions,
        )
        await ensure_topics(settings, events.topics())
        await recreate_misshapen_topics(settings, events.topics())

    async def migrate(self) -> None:
        await migrations.migrate_services(self.database_url, BACKEND_SERVICES)

    def _echo(self) -> TextIO | None:
        return sys.stdout if self.config.echo_logs else None

    def _base_env(self) -> dict[str, str]:
        env = {"ADMIN_EMAIL": "admin@herald.example", **self.secrets}
        env.update({k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})
        env.update(self.config.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def service_env(self, name: str) -> dict[str, str]:
        """The environment a service process gets: the stack's addresses, then overrides."""
        ports = self.config.service_ports
        env = self._base_env()
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
                "KAFKA_PARTITIONS": str(self.config.kafka_partitions),
                "SMTP_URL": self.smtp_url,
            }
        )
        for service, port in ports.items():
            env[f"{service.upper()}_PORT"] = str(port)
            env[f"{service.upper()}_URL"] = f"http://127.0.0.1:{port}"
        env.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{ports['gateway']}")
        return env

    async def start_service(
        self,
        name: str,
        *,
        replica: str | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        """Start service `name`, with `env` over its usual environment.

        With `replica`, a further process of the service under that name (its log, its entry in
        `services`), listening on `port` (a free one if not given) so it can run beside the first.
        """
        key = replica or name
        environment = self.service_env(name)
        if replica is not None:
            listen = port or free_port()
            environment[f"{name.upper()}_PORT"] = str(listen)
            self.replica_ports[key] = listen
        environment.update(env or {})
        process = ServiceProcess(
            key, environment, self.logs_dir / f"{key}.log", self._echo(), module=name
        )
        await process.start()
        self.services[key] = process
        return process

    async def stop_service(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        process = self.services.pop(name, None)
        if process is not None:
            await process.stop(sig)

    async def start(self, timeout: float = 90) -> None:
        """Everything, in order: infrastructure, topics and migrations, services, readiness."""
        await self.start_infrastructure()
        await asyncio.gather(self.create_topics(), self.migrate())
        for name in SERVICES:
            await self.start_service(name)
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 90, services: list[str] | None = None) -> None:
        """Wait until each service's `/readyz` answers 200; fail fast if one exits."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            for name in services or list(self.services):
                while True:
                    process = self.services.get(name)
                    if process is None or not process.alive:
                        raise RuntimeError(f"{name} is not running; see {self.logs_dir}/{name}.log")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{self.url(name)}/readyz")).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{name} not ready; see {self.logs_dir}/{name}.log")
                    await asyncio.sleep(0.2)

    async def _wait_http(self, url: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not come up at {url}")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop services (gateway first), then the sink, broker and database."""
        await self.stop_service("gateway")
        await asyncio.gather(*(self.stop_service(name) for name in list(self.services)))
        if self.sink is not None:
            await self.sink.stop()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
