"""`make run`: the whole platform on embedded defaults, until Ctrl-C.

Every address can be overridden by environment variable; DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS and
SMTP_URL replace the embedded server with a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from herald.devinfra.stack import SERVICES, Stack, StackConfig
from herald.devinfra.tls import development_certificate
from herald.settings import SERVICE_PORTS


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _tls_env(data_dir: Path) -> dict[str, str]:
    """HTTPS for the gateway: the operator's files when given, else a development certificate."""
    if os.environ.get("TLS_CERT_FILE") or os.environ.get("TLS_KEY_FILE"):
        return {}
    cert, key = development_certificate(data_dir / "tls")
    return {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}


def config_from_env() -> StackConfig:
    """The stack `make run` starts, as the environment describes it."""
    data_dir = Path(os.environ.get("HERALD_DATA_DIR", ".data")).resolve()
    return StackConfig(
        data_dir=data_dir,
        service_ports={s: _port(f"{s.upper()}_PORT", p) for s, p in SERVICE_PORTS.items()},
        database_url=os.environ.get("DATABASE_URL") or None,
        kafka_bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        smtp_url=os.environ.get("SMTP_URL") or None,
        pg_port=_port("PG_PORT", 55432),
        broker_port=_port("BROKER_PORT", 9092),
        sink_smtp_port=_port("SINK_SMTP_PORT", 1025),
        sink_http_port=_port("SINK_HTTP_PORT", 8025),
        kafka_partitions=_port("KAFKA_PARTITIONS", 6),
        echo_logs=os.environ.get("HERALD_ECHO_LOGS", "1") != "0",
        env={
            "KAFKA_SESSION_TIMEOUT_MS": os.environ.get("KAFKA_SESSION_TIMEOUT_MS", "6000"),
            **_tls_env(data_dir),
        },
    )


def _say(text: str) -> None:
    print(f"herald | {text}", flush=True)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}" if ":" in credentials else url
    return url


async def run() -> int:
    stack = Stack(config_from_env())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        _say("starting infrastructure")
        await stack.start_infrastructure()
        _say("creating topics and applying migrations")
        await asyncio.gather(stack.create_topics(), stack.migrate())
        _say("starting services: " + ", ".join(SERVICES))
        for name in SERVICES:
            await stack.start_service(name)
        ready = asyncio.create_task(stack.wait_ready(90))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            ready.cancel()
            return 130
        ready.result()
        _summary(stack, time.monotonic() - started)
        await _watch(stack, stop)
        return 0
    except Exception as exc:
        _say(f"failed: {exc}")
        return 1
    finally:
        _say("stopping")
        await stack.stop()
        _say("stopped")


async def _watch(stack: Stack, stop: asyncio.Event) -> None:
    """Until Ctrl-C, say when a service process exits on its own (its log says why)."""
    reported: set[str] = set()
    while not stop.is_set():
        for name, process in stack.services.items():
            if not process.alive and name not in reported:
                reported.add(name)
                _say(f"{name} exited; see {process.log_path}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1)


def _summary(stack: Stack, seconds: float) -> None:
    cfg = stack.config
    lines = [
        f"all {len(SERVICES)} services ready in {seconds:.1f}s",
        f"  API (gateway)     {stack.url('gateway')}   docs: {stack.url('gateway')}/docs",
        f"  readiness         {stack.url('gateway')}/readyz",
    ]
    gateway_env = stack.service_env("gateway")
    if gateway_env.get("TLS_CERT_FILE"):
        https = f"https://127.0.0.1:{gateway_env.get('GATEWAY_TLS_PORT', '8443')}"
        ca = Path(gateway_env["TLS_CERT_FILE"]).with_name("ca.pem")
        trust = f"   (trust {ca})" if ca.is_file() else ""
        lines.append(f"  API over HTTPS     {https}{trust}")
    for name in SERVICES[1:]:
        lines.append(f"  {name:<17} {stack.url(name)}")
    lines.append(f"  PostgreSQL        {_redact(stack.database_url)}")
    lines.append(f"  Kafka             {stack.kafka_bootstrap_servers}")
    lines.append(f"  SMTP              {_redact(stack.smtp_url)}")
    if stack.sink is not None:
        lines.append(f"  mail sink (web)   {stack.sink_url}")
    admin = stack.service_env("auth")["ADMIN_EMAIL"]
    where = "ADMIN_PASSWORD" if os.environ.get("ADMIN_PASSWORD") else "secrets/admin_password"
    lines.append(f"  administrator     {admin} (password: {where})")
    lines.append(f"  logs              {stack.logs_dir}")
    lines.append(f"  data              {cfg.data_dir}")
    lines.append("press Ctrl-C to stop")
    for line in lines:
        _say(line)


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
