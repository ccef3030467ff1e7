"""Dispatcher throughput into Postfix's smtp-sink, against a bare aiosmtplib loop, in one run.

(a) bare: one prebuilt message sent again and again with aiosmtplib over N connections, the
    ceiling of a Python process talking SMTP (no rendering, no database, no events); run
    first and again last, the ratios taken to the mean of both (the machine's load drifts);
(b) dispatcher: DispatchBatch events for R recipients published on Kafka, consumed by the
    dispatcher process(es), each message rendered, tracked, signed and handed to smtp-sink over
    N connections per process, timed until every message record says `sent` (which follows the
    relay's 250). The dispatcher's CPU time per message is read from the OS.
(c) the whole platform: POST /send of an email composed for an R-contact list (imported as
    CSV), through gateway, campaign, contacts, scheduler, Kafka and dispatcher, timed the same
    way; reported as not measured when another service is missing or fails.

Postfix's `smtp-sink` is installed with the `postfix` package (as root on Debian/Ubuntu, this
script installs it). The database is durable (fsync on) unless --fast-db is given.

    .venv/bin/python bench/dispatcher_throughput.py [--recipients 20000] [--connections 32]
        [--dispatchers 1] [--fast-db] [--skip-full] [--timeline]
        [--fixed-poll]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import asyncpg
import psutil
from aiokafka import AIOKafkaProducer

from dispatcher.message import EmailPlan, Options, Recipient
from dispatcher.tokens import TokenMint
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, ServiceProcess, Stack, StackConfig
from herald.events import Envelope
from herald.events.campaign import EmailContent
from herald.events.scheduler import DispatchBatch
from herald.events.scheduler import Recipient as BatchRecipient

BATCH = 500
CONTENT = EmailContent(
    subject="{{ contact.first_name | default('Friend') }}, the spring issue is out",
    text=(
        "Hello {{ contact.first_name | default('there') }},\n\n"
        + "This is a paragraph of the newsletter that says something worth reading.\n" * 12
        + "\nRead online: https://example.com/issues/42\n"
        "Unsubscribe: {{ unsubscribe_url }}\n"
    ),
    html=(
        "<!doctype html><html><head><meta charset='utf-8'><title>Spring</title></head><body>"
        "<h1>Hello {{ contact.first_name | default('there') }}</h1>"
        + "".join(
            f"<p>Paragraph {i}: something worth reading, with "
            f'<a href="https://example.com/articles/{i}?utm_source=herald&amp;utm_medium=email">'
            f"a link</a> to more.</p>\n"
            for i in range(8)
        )
        + '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>'
    ),
    from_name="Herald Bench",
    from_email="bench@herald.example",
)


def find_smtp_sink() -> str:
    """The smtp-sink binary, installing Postfix when we may; exits with advice when we cannot."""
    for candidate in (shutil.which("smtp-sink"), "/usr/sbin/smtp-sink"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing postfix for its smtp-sink (apt-get install -y postfix)...", flush=True)
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "postfix"], env=env, check=False)
        if os.access("/usr/sbin/smtp-sink", os.X_OK):
            return "/usr/sbin/smtp-sink"
    sys.exit(
        "Postfix's smtp-sink is needed as the relay. Install it with\n"
        "    sudo apt-get install postfix      (Debian, Ubuntu)\n"
        "    sudo dnf install postfix          (Fedora, RHEL)\n"
        "    brew install postfix              (macOS)\n"
        "and run this again."
    )


def start_smtp_sink(binary: str, port: int) -> subprocess.Popen[bytes]:
    command = [binary]
    if os.geteuid() == 0:
        command += ["-u", "nobody"]  # smtp-sink refuses to run as root
    process = subprocess.Popen(
        [*command, f"127.0.0.1:{port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    sys.exit("smtp-sink did not start")


def sample_message() -> tuple[bytes, str, str]:
    """A message as the dispatcher builds them, for the bare loop to send prebuilt."""
    plan = EmailPlan(
        email_id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        kind="campaign",
        content=CONTENT,
        template_vars={},
        options=Options(public_base_url="http://127.0.0.1:8000"),
        mint=TokenMint("bench:bench-secret"),
    )
    built = plan.build(Recipient(uuid.uuid4(), "someone@bench.example", "Some", "One"))
    return built.data, built.sender.address, built.recipient.address


@dataclass
class Result:
    messages: int
    seconds: float
    cpu_seconds: float
    # CPU seconds PostgreSQL and the broker spent meanwhile (the database's share of each message).
    infra_cpu_seconds: float = 0.0
    timeline: Timeline | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def bare_loop(port: int, connections: int, count: int) -> Result:
    data, sender, recipient = sample_message()
    left = count

    async def worker() -> None:
        nonlocal left
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, local_hostname="bench"
        )
        await client.connect()
        while left > 0:
            left -= 1
            await client.sendmail(sender, [recipient], data)
        await client.quit()

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return Result(count, time.perf_counter() - started, time.process_time() - cpu)


def batches(email_id: uuid.UUID, count: int, tag: str) -> list[DispatchBatch]:
    return [
        DispatchBatch(
            email_id=email_id,
            batch_no=n,
            kind="campaign",
            content=CONTENT,
            recipients=[
                BatchRecipient(
                    email=f"{tag}-{i}@bench.example",
                    contact_id=uuid.uuid4(),
                    first_name=f"Reader{i}",
                    attributes={"plan": "free"},
                )
                for i in range(start, min(start + BATCH, count))
            ],
        )
        for n, start in enumerate(range(0, count, BATCH))
    ]


async def publish(stack: Stack, events: list[DispatchBatch]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka_bootstrap_servers, linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        account_id = uuid.uuid4()
        futures = [
            await producer.send(
                DispatchBatch.TOPIC,
                Envelope.wrap(event, account_id=account_id).to_bytes(),
                key=event.partition_key().encode(),
            )
            for event in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


# (seconds since the start, messages queued, messages sent) of one email, polled.
Timeline = list[tuple[float, int, int]]


@dataclass(frozen=True)
class Watch:
    """How a run is watched until every message is sent."""

    timeline: bool = False  # keep what each poll saw
    fixed_poll: bool = False  # poll every 50 ms, as this script did before


async def wait_sent(
    stack: Stack, email_id: uuid.UUID, count: int, timeout: float, watch: Watch = Watch()
) -> Timeline | None:
    """Wait until `count` messages of the email are sent; what the polls saw, if asked."""
    timeline: Timeline | None = [] if watch.timeline else None
    conn = await asyncpg.connect(stack.database_url)
    try:
        started = time.monotonic()
        deadline = started + timeout
        before = (started, 0)
        while True:
            if timeline is None:
                sent = await conn.fetchval(
                    "SELECT count(*) FROM dispatcher.messages"
                    " WHERE email_id = $1 AND state = 'sent'",
                    email_id,
                )
            else:
                row = await conn.fetchrow(
                    """SELECT count(*) AS queued, count(*) FILTER (WHERE state = 'sent') AS sent
                       FROM dispatcher.messages WHERE email_id = $1""",
                    email_id,
                )
                assert row is not None  # an aggregate always has its row
                queued, sent = row["queued"], row["sent"]
                timeline.append((time.monotonic() - started, queued, sent))
            if sent >= count:
                return timeline
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"only {sent} of {count} sent")
            # Each count reads every record of the email: milliseconds of the database's CPU,
            # which the run being measured needs. Polled every 50 ms that was a tenth of a core;
            # so poll at half the time left at the latest rate, every 50 ms only near the end.
            progress, elapsed = sent - before[1], now - before[0]
            left = (count - sent) * elapsed / progress if progress > 0 else float("inf")
            before = (now, sent)
            # A timeline wants a poll each half second; otherwise only the last one matters.
            longest = 0.5 if timeline is not None else 5.0
            await asyncio.sleep(0.05 if watch.fixed_poll else min(max(left / 2, 0.05), longest))
    finally:
        await conn.close()


def cpu_of(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


async def settle(processes: list[psutil.Process], stack: Stack, timeout: float = 120) -> None:
    """Wait until the services, PostgreSQL and the broker are idle: under 5% of a core each
    half second, twice in a row."""
    quiet, deadline = 0, time.monotonic() + timeout
    while quiet < 2 and time.monotonic() < deadline:
        infra, before = InfraCpu(stack), cpu_of(processes)
        await asyncio.sleep(0.5)
        busy = cpu_of(processes) - before + infra.seconds()
        quiet = quiet + 1 if busy < 0.025 * (len(processes) + 1) else 0


class InfraCpu:
    """CPU time of the embedded PostgreSQL (server and backends) and broker, between two reads.

    Backends that start in between count from zero; ones that end in between are missed, which
    the persistent pools of the services make rare.
    """

    def __init__(self, stack: Stack) -> None:
        self._roots: list[psutil.Process] = []
        if stack.postgres is not None:
            pid_file = stack.postgres.data_dir / "postmaster.pid"
            self._roots.append(psutil.Process(int(pid_file.read_text().split()[0])))
        if stack.broker is not None and stack.broker.pid is not None:
            self._roots.append(psutil.Process(stack.broker.pid))
        self._start = self._read()

    def _read(self) -> dict[int, float]:
        spent: dict[int, float] = {}
        for root in self._roots:
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    spent[process.pid] = times.user + times.system
        return spent

    def seconds(self) -> float:
        """CPU seconds spent since this was made."""
        now = self._read()
        return sum(value - self._start.get(pid, 0.0) for pid, value in now.items())


async def dispatcher_path(stack: Stack, count: int, dispatchers: int, watch: Watch) -> Result:
    extra = []
    for n in range(1, dispatchers):
        port = free_port()
        env = stack.service_env("dispatcher") | {"DISPATCHER_PORT": str(port)}
        name = f"dispatcher-{n + 1}"
        replica = ServiceProcess("dispatcher", env, stack.logs_dir / f"{name}.log", None)
        await replica.start()
        stack.config.service_ports[name] = port
        stack.services[name] = replica
        extra.append(name)
    await stack.wait_ready(90, ["dispatcher", *extra])
    pids = [
        stack.services[name].process.pid  # type: ignore[union-attr]
        for name in ["dispatcher", *extra]
    ]
    processes = [psutil.Process(pid) for pid in pids]

    # Warm up: consumer group joined, connections open, code paths taken once.
    warm = uuid.uuid4()
    await publish(stack, batches(warm, 1000, "warm"))
    await wait_sent(stack, warm, 1000, 120, watch)

    email_id = uuid.uuid4()
    events = batches(email_id, count, "bench")
    infra, cpu, started = InfraCpu(stack), cpu_of(processes), time.perf_counter()
    await publish(stack, events)
    polled = await wait_sent(stack, email_id, count, 600, watch)
    seconds = time.perf_counter() - started
    return Result(count, seconds, cpu_of(processes) - cpu, infra.seconds(), polled)


async def full_path(stack: Stack, count: int, watch: Watch) -> Result:
    """POST /send of a composed email to a `count`-contact list, through the gateway."""
    import httpx

    from auth.tokens import SigningKey, issue_access_token
    from herald.events.auth import UserChanged

    # The gateway is ready only when every service it routes to is.
    others = [name for name in SERVICES if name not in stack.services]
    for name in others:
        await stack.start_service(name)
    await stack.wait_ready(180, others)
    user_id = uuid.uuid4()
    sender = f"sender-{user_id.hex[:8]}@herald.example"
    token = issue_access_token(
        SigningKey.from_pem(stack.secrets["JWT_PRIVATE_KEY"]),
        user_id=user_id,
        role="user",
        scope="full",
        issuer="herald",
        audience="herald-api",
        ttl_seconds=3600,
    ).token
    # As auth announces a verified user, so that campaign accepts the sender.
    change = UserChanged(
        user_id=user_id,
        email=sender,
        email_verified=True,
        status="active",
        role="user",
        timezone="UTC",
        daily_send_quota=None,
        default_sender_name="Bench",
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            change.TOPIC,
            Envelope.wrap(change, account_id=user_id).to_bytes(),
            key=change.partition_key().encode(),
        )
    finally:
        await producer.stop()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=headers, timeout=60) as api:
        list_id = (await api.post("/lists", json={"name": "bench"})).raise_for_status().json()["id"]
        rows = "".join(f"full-{i}@bench.example,Reader{i}\n" for i in range(count))
        job = (
            (
                await api.post(
                    "/contacts/import",
                    data={"list_id": list_id},
                    files={"file": ("bench.csv", "email,first_name\n" + rows, "text/csv")},
                )
            )
            .raise_for_status()
            .json()["job_id"]
        )
        for _ in range(1200):
            status = (await api.get(f"/contacts/import/{job}")).json()["status"]
            if status in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.5)
        if status != "succeeded":
            raise RuntimeError("the contact import failed")
        composed = {**CONTENT.model_dump(exclude={"track_opens", "track_clicks", "tags"})}
        composed |= {"from_email": sender, "list_ids": [list_id]}
        deadline = time.monotonic() + 60
        while (response := await api.post("/compose", json=composed)).status_code != 201:
            if time.monotonic() > deadline:  # campaign may not have taken the user in yet
                raise RuntimeError(f"compose answered {response.status_code}: {response.text}")
            await asyncio.sleep(0.5)
        email_id = uuid.UUID(response.json()["id"])
        processes = {
            name: psutil.Process(service.process.pid)
            for name, service in stack.services.items()
            if service.process is not None
        }
        # Campaign and tracking started with (b)'s 20,000 outcome events waiting for them on
        # Kafka; they are not (c)'s work, so the clock starts when everything is quiet.
        await settle([*processes.values()], stack)
        infra, before = InfraCpu(stack), {name: cpu_of([p]) for name, p in processes.items()}
        started = time.perf_counter()
        (await api.post("/send", json={"email_id": str(email_id)})).raise_for_status()
        polled = await wait_sent(stack, email_id, count, 900, watch)
    seconds = time.perf_counter() - started
    spent = {name: cpu_of([p]) - before[name] for name, p in processes.items()}
    print(
        "(c) CPU seconds by service: "
        + ", ".join(f"{name} {value:.1f}" for name, value in sorted(spent.items()))
        + f"; PostgreSQL and broker {infra.seconds():.1f}"
    )
    dispatcher = sum(v for k, v in spent.items() if k.startswith("dispatcher"))
    return Result(count, seconds, dispatcher, timeline=polled)


def print_timeline(name: str, timeline: Timeline | None) -> None:
    """Messages queued and sent as first polled in each second (where a run waits: fan-out or
    sending)."""
    if not timeline:
        return
    marks, second = [], 1.0
    for at, queued, sent in timeline:
        if at >= second:
            marks.append(f"{at:.1f}s {queued}/{sent}")
            second = float(int(at) + 1)
    at, queued, sent = timeline[-1]
    final = f"{at:.1f}s {queued}/{sent}"
    if not marks or marks[-1] != final:
        marks.append(final)
    print(f"{name} queued/sent over time: " + ", ".join(marks))


async def main(
    recipients: int,
    connections: int,
    dispatchers: int,
    fast_db: bool,
    skip_full: bool,
    watch: Watch,
) -> None:
    binary = find_smtp_sink()
    sink_port = free_port()
    sink = start_smtp_sink(binary, sink_port)
    data_dir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    data_dir.chmod(0o755)
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            service_ports={s: free_port() for s in SERVICES},
            smtp_url=f"smtp://127.0.0.1:{sink_port}",
            pg_port=free_port(),
            broker_port=free_port(),
            durable=not fast_db,
            env={
                "LOG_LEVEL": "WARNING",
                "DISPATCHER_CONCURRENCY": str(connections),
                "KAFKA_SESSION_TIMEOUT_MS": "6000",
            },
        )
    )
    try:
        await stack.start_infrastructure()
        await asyncio.gather(stack.create_topics(), stack.migrate())
        bare = await bare_loop(sink_port, connections, recipients)
        await stack.start_service("dispatcher")
        ours = await dispatcher_path(stack, recipients, dispatchers, watch)
        full: Result | str = "skipped (--skip-full)"
        if not skip_full:
            try:
                full = await full_path(stack, recipients, watch)
            except Exception as exc:
                full = f"not measured ({type(exc).__name__}: {exc})"
        # The machine's other load drifts over a run of minutes: (a) once more at the end, and
        # the ratios are taken against the mean of both.
        again = await bare_loop(sink_port, connections, recipients)
    finally:
        await stack.stop()
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"relay: Postfix smtp-sink; {os.cpu_count()} cores; database durable: {not fast_db}; "
        f"load average at the end {load} (above the core count, every rate below is shared)"
    )
    print(
        f"(a) bare aiosmtplib loop, prebuilt bytes, {connections} connections: "
        f"{bare.rate:.0f} messages/s ({bare.cpu_seconds / bare.messages * 1e6:.0f} us CPU each)"
        f" first, {again.rate:.0f} messages/s"
        f" ({again.cpu_seconds / again.messages * 1e6:.0f} us CPU each) last; the ratios below"
        f" are to their mean, {(bare.rate + again.rate) / 2:.0f} messages/s"
    )
    baseline = (bare.rate + again.rate) / 2
    print(
        f"(b) DispatchBatch on Kafka -> {dispatchers} dispatcher process(es) x {connections} "
        f"connections -> smtp-sink, {recipients} recipients: {ours.rate:.0f} messages/s "
        f"({ours.seconds:.1f} s)"
    )
    print_timeline("(b)", ours.timeline)
    print(f"ratio (b)/(a): {ours.rate / baseline:.2f}")
    per_message = ours.cpu_seconds / ours.messages
    infra_per_message = ours.infra_cpu_seconds / ours.messages
    print(
        f"dispatcher CPU: {per_message * 1e6:.0f} us per message "
        f"({ours.cpu_seconds:.1f} s in all, consuming, rendering, SMTP, recording, publishing); "
        f"PostgreSQL and broker meanwhile: {infra_per_message * 1e6:.0f} us per message"
    )
    # Rates depend on what else the machine runs; CPU per message much less so.
    print(
        f"CPU ratio (a)/(b): bare {bare.cpu_seconds / bare.messages * 1e6:.0f} us over "
        f"dispatcher {per_message * 1e6:.0f} us = "
        f"{bare.cpu_seconds / bare.messages / per_message:.2f}; with the database and broker's "
        f"share: {bare.cpu_seconds / bare.messages / (per_message + infra_per_message):.2f}"
    )
    if isinstance(full, Result):
        print(
            f"(c) POST /send to a {recipients}-contact list through gateway, campaign, contacts, "
            f"scheduler, Kafka, dispatcher -> smtp-sink: {full.rate:.0f} messages/s "
            f"({full.seconds:.1f} s); ratio (c)/(a): {full.rate / baseline:.2f}; dispatcher CPU "
            f"{full.cpu_seconds / full.messages * 1e6:.0f} us per message"
        )
        print_timeline("(c)", full.timeline)
    else:
        print(f"(c) the full path through the gateway: {full}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--dispatchers", type=int, default=1)
    parser.add_argument("--fast-db", action="store_true", help="PostgreSQL without fsync")
    parser.add_argument("--skip-full", action="store_true", help="measure (a) and (b) only")
    parser.add_argument(
        "--timeline", action="store_true", help="print messages queued and sent each second"
    )
    parser.add_argument(
        "--fixed-poll",
        action="store_true",
        help="count sent messages every 50 ms, as before (the counts cost the database a tenth "
        "of a core, which the measured runs lose)",
    )
    options = parser.parse_args()
    asyncio.run(
        main(
            options.recipients,
            options.connections,
            options.dispatchers,
            options.fast_db,
            options.skip_full,
            Watch(timeline=options.timeline, fixed_poll=options.fixed_poll),
        )
    )
