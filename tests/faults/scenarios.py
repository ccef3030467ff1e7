"""The faults, one function each: send the run's email and inject one fault while it goes out.

Each takes a `Run` (see harness) and returns once the fault is over and the platform is left to
recover; the harness then waits for the send to finish and draws up its ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from campaign.handlers import ALSO_CONSUMES as CAMPAIGN_REQUESTS_TOPICS
from campaign.handlers import HANDLERS as CAMPAIGN_HANDLERS
from contacts.handlers import HANDLERS as CONTACTS_HANDLERS
from dispatcher.handlers import HANDLERS as DISPATCHER_HANDLERS
from herald.events import EventData
from scheduler.handlers import HANDLERS as SCHEDULER_HANDLERS
from tests.faults.harness import Run, Scenario, database, eventually
from tests.faults.relay_gate import RelayGate
from tracking.handlers import HANDLERS as TRACKING_HANDLERS

# Where the faults strike: after this share of the recipients has mail.
MIDWAY = 0.25


async def no_fault(run: Run) -> None:
    """The baseline: the same send with nothing going wrong."""
    await run.send()


async def _fanout_under_way(run: Run, conn: asyncpg.Connection) -> None:
    """Return once the email's fan-out has handed out two batches (or has ended)."""

    async def midway() -> bool:
        row = await conn.fetchrow(
            "SELECT state, batch_no FROM scheduler.fanouts WHERE email_id = $1",
            uuid.UUID(run.email_id),
        )
        return row is not None and (row["state"] != "running" or row["batch_no"] >= 2)

    await eventually(midway, "the fan-out to be under way", timeout=60, interval=0.01)


async def dispatcher_killed(run: Run) -> None:
    """1. SIGKILL the dispatcher mid-send; restart it."""
    await run.send()
    await run.wait_delivered(MIDWAY)
    await run.stack.stop_service("dispatcher", signal.SIGKILL)
    await run.fault_came_in_time()
    await run.stack.start_service("dispatcher")
    await run.stack.wait_ready(90, ["dispatcher"])


async def scheduler_killed(run: Run) -> None:
    """2. SIGKILL the scheduler while it fans the email out (some batches handed out, not all)."""
    conn = await database(run.stack)
    try:
        await run.send()
        await _fanout_under_way(run, conn)
        await run.stack.stop_service("scheduler", signal.SIGKILL)
        state = await conn.fetchval(
            "SELECT state FROM scheduler.fanouts WHERE email_id = $1", uuid.UUID(run.email_id)
        )
        if state != "running":
            run.problem(f"the fan-out was {state} before the kill: nothing was tested")
    finally:
        await conn.close()
    await run.stack.start_service("scheduler")
    await run.stack.wait_ready(90, ["scheduler"])


async def campaign_killed(run: Run) -> None:
    """3. SIGKILL campaign after it accepted /send (committed) and before it published.

    Its outbox relay publishes within milliseconds, so the window is held open the way a stalled
    replica would hold it: the test takes the relay's leadership lock, so the accepted send waits
    in the outbox; campaign is killed there, the lock is let go, and campaign restarts.
    """
    conn = await database(run.stack)
    try:
        await run.stack.stop_service("campaign")
        await conn.execute("SELECT pg_advisory_lock(hashtext('herald-outbox:campaign'))")
        await run.stack.start_service("campaign")
        await run.stack.wait_ready(90, ["campaign"])
        await run.send()
        waiting = await conn.fetchval(
            "SELECT count(*) FROM campaign.outbox WHERE topic = 'email.scheduled'"
            " AND published_at IS NULL AND convert_from(payload, 'UTF8') LIKE '%' || $1 || '%'",
            run.email_id,
        )
        if waiting != 1:
            run.problem(f"{waiting} unpublished events of the email at the kill, not 1")
        await run.stack.stop_service("campaign", signal.SIGKILL)
    finally:
        await conn.close()  # lets the lock go
    await run.stack.start_service("campaign")
    await run.stack.wait_ready(90, ["campaign"])


async def relay_outage(run: Run) -> None:
    """4. The relay refuses connections for a while, then answers 451 for a while, recovers."""
    gate = RelayGate(run.stack.config.sink_smtp_port)
    await gate.go_up()

    async def restore() -> None:
        await run.sink.delete("/api/behaviour")
        await run.stack.stop_service("dispatcher")
        await gate.close()
        await run.stack.start_service("dispatcher")
        await run.stack.wait_ready(90, ["dispatcher"])

    run.cleanups.append(restore)
    await run.stack.stop_service("dispatcher")
    await run.stack.start_service("dispatcher", env={"SMTP_URL": gate.url})
    await run.stack.wait_ready(90, ["dispatcher"])
    await run.send()
    await run.wait_delivered(MIDWAY)
    await gate.go_down()
    await run.fault_came_in_time()
    await asyncio.sleep(run.settings.relay_refused_seconds)
    # Up again, but every recipient of this send is deferred (451 at RCPT TO) for a while.
    rules = {"rules": [{"match": run.tag, "action": "defer"}]}
    (await run.sink.put("/api/behaviour", json=rules)).raise_for_status()
    await gate.go_up()
    await asyncio.sleep(run.settings.relay_deferring_seconds)
    (await run.sink.delete("/api/behaviour")).raise_for_status()


async def postgres_restarted(run: Run) -> None:
    """5. PostgreSQL stops in the middle of the send and starts again."""
    await run.send()
    await run.wait_delivered(MIDWAY)
    await run.stack.stop_postgres("fast")
    await run.fault_came_in_time()
    await asyncio.sleep(run.settings.postgres_down_seconds)
    await run.stack.start_postgres()


async def broker_restarted(run: Run) -> None:
    """6. The broker restarts mid-send; the embedded one loses every topic and message.

    It goes down as the fan-out hands out batches: the dispatcher takes up batches within
    milliseconds and then needs the broker no more, so later the loss would only hit outcomes.
    Here both delivery batches and outcomes (`email.dispatched`) are in flight. The services'
    outbox relays must notice the loss on their own and publish again what it took.
    """
    conn = await database(run.stack)
    try:
        await run.send()
        await _fanout_under_way(run, conn)
    finally:
        await conn.close()
    before = await _republished(run)
    await run.stack.stop_broker(kill=True)
    await run.fault_came_in_time()
    await asyncio.sleep(run.settings.broker_down_seconds)
    await run.stack.start_broker()

    async def republished() -> bool:
        return await _republished(run) > before

    try:
        await eventually(republished, "a relay to publish again what the broker lost", timeout=30)
    except AssertionError:
        run.problem("no outbox relay published anything again after the broker lost its memory")


async def _republished(run: Run) -> float:
    """Events the services' relays queued again, from their /metrics, summed."""
    total = 0.0
    for name in ("auth", "contacts", "campaign", "scheduler", "dispatcher", "tracking"):
        async with httpx.AsyncClient(base_url=run.stack.url(name), timeout=10) as client:
            for line in (await client.get("/metrics")).text.splitlines():
                if line.startswith("herald_outbox_republished_total "):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def _consumed(handlers: Iterable[type[EventData]]) -> set[str]:
    return {cls.TOPIC for cls in handlers}


# Every consumer group and the topics it reads, from the services' own handler maps.
CONSUMERS: dict[str, set[str]] = {
    "contacts": _consumed(CONTACTS_HANDLERS),
    "campaign": _consumed(CAMPAIGN_HANDLERS),
    "campaign-requests": set(CAMPAIGN_REQUESTS_TOPICS),
    "scheduler": _consumed(SCHEDULER_HANDLERS),
    "dispatcher": _consumed(DISPATCHER_HANDLERS),
    "tracking": _consumed(TRACKING_HANDLERS),
}


def _poison(marker: str) -> dict[bytes, str]:
    """Messages no reader can take, and what the dead-letter reason must say of each."""
    unknown = {
        "id": str(uuid.uuid4()),
        "type": f"drill.{marker}",
        "version": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        "account_id": None,
        "data": {},
    }
    return {
        f"{{not json {marker}".encode(): "not JSON",
        orjson.dumps(unknown): "event type",
    }


async def poison_everywhere(run: Run) -> None:
    """7. A poison message on every consumed topic: each lands on `<topic>.dlq` with its reason
    (once per consumer group reading the topic), and the send behind it goes through."""
    marker = uuid.uuid4().hex
    poison = _poison(marker)
    topics = sorted(set().union(*CONSUMERS.values()))
    producer = AIOKafkaProducer(bootstrap_servers=run.stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        for topic in topics:
            for value in poison:
                # Keyed like the send's own events may be, so it sits in front of some of them.
                await producer.send_and_wait(topic, value, key=run.email_id.encode())
    finally:
        await producer.stop()
    await run.send()

    async def all_dead_lettered() -> bool:
        found = await _dead_letters(run, topics, marker)
        return all(
            {(topic, group, value) for value in poison} <= found.keys()
            for group, read in CONSUMERS.items()
            for topic in read
        )

    with contextlib.suppress(AssertionError):  # what is missing is listed below
        await eventually(
            all_dead_lettered, "every poison message on a .dlq", timeout=90, interval=1
        )
    found = await _dead_letters(run, topics, marker)
    for group, read in sorted(CONSUMERS.items()):
        for topic in sorted(read):
            for value, reason in poison.items():
                said = found.get((topic, group, value))
                if said is None:
                    run.problem(f"{group} did not dead-letter {value[:20]!r} from {topic}")
                elif reason not in said:
                    run.problem(f"{group} dead-lettered {topic} saying {said!r}, not {reason!r}")
    unexpected = {key[:2] for key in found} - {(t, g) for g, ts in CONSUMERS.items() for t in ts}
    if unexpected:
        run.problem(f"dead letters from unexpected readers: {sorted(unexpected)}")


async def _dead_letters(
    run: Run, topics: list[str], marker: str
) -> dict[tuple[str, str, bytes], str]:
    """(topic, group, value) -> reason of every dead letter carrying `marker`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=run.stack.kafka_bootstrap_servers, group_id=None)
    await consumer.start()
    found: dict[tuple[str, str, bytes], str] = {}
    try:
        await consumer.topics()
        partitions = [
            TopicPartition(f"{topic}.dlq", p)
            for topic in topics
            for p in consumer.partitions_for_topic(f"{topic}.dlq") or ()
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in partitions]
            if all(at >= end[tp] for at, tp in zip(positions, partitions, strict=True)):
                break
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    if record.value is None or marker.encode() not in record.value:
                        continue
                    headers = {k: v.decode() for k, v in record.headers or ()}
                    key = (
                        headers.get("dlq.topic", "?"),
                        headers.get("dlq.group", "?"),
                        record.value,
                    )
                    found[key] = headers.get("dlq.reason", "")
    finally:
        await consumer.stop()
    return found


async def _sent_by(client: httpx.AsyncClient) -> float:
    """The dispatcher's count of messages the relay accepted, from its /metrics."""
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith('herald_dispatcher_messages_total{outcome="sent"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def two_replicas(run: Run) -> None:
    """8. Two replicas of the scheduler and of the dispatcher run through the whole send."""
    stack = run.stack
    for name in ("scheduler", "dispatcher"):
        await stack.start_service(name, replica=f"{name}-2")
    await stack.wait_ready(90, ["scheduler-2", "dispatcher-2"])

    async def stop_replicas() -> None:
        for name in ("scheduler-2", "dispatcher-2"):
            await stack.stop_service(name)

    run.cleanups.append(stop_replicas)
    async with (
        httpx.AsyncClient(base_url=stack.url("dispatcher"), timeout=10) as first,
        httpx.AsyncClient(base_url=stack.url("dispatcher-2"), timeout=10) as second,
    ):
        before = await _sent_by(first)
        await run.send()
        await run.finish()
        shares = [await _sent_by(first) - before, await _sent_by(second)]
    if min(shares) == 0:
        run.problem(f"one dispatcher replica sent nothing (sent: {shares}): nothing was shared")


# In the order they run on one stack: the faults that take infrastructure down come last.
SCENARIOS: dict[str, Scenario] = {
    "1 dispatcher SIGKILL": dispatcher_killed,
    "2 scheduler SIGKILL": scheduler_killed,
    "3 campaign SIGKILL": campaign_killed,
    "4 relay outage": relay_outage,
    "7 poison messages": poison_everywhere,
    "8 two replicas": two_replicas,
    "5 PostgreSQL restart": postgres_restarted,
    "6 broker restart": broker_restarted,
}
