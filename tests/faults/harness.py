"""The fault suite's harness: a platform of its own, a campaign sent as a user sends it, and the
ledger that says whether every recipient got exactly one copy.

The suite restarts PostgreSQL and the broker, so it never shares the session's `platform`: it
starts its own Stack (free ports, its own data directory). A run signs a user up and confirms the
address from the mail in the SMTP sink, builds a list of contacts (some suppressed) through the
gateway, composes a list email and sends it; a scenario injects one fault on the way. Afterwards
the sink (every message by recipient and Message-ID), campaign's status and counts and tracking's
per-recipient report are set against each other. `bench/faults_report.py` runs the same scenarios
and prints their ledgers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import httpx

from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig
from herald.links import LinkSigner, UnsubscribeToken

HEAVY = os.environ.get("HERALD_FAULTS_HEAVY") == "1"
PASSWORD = "faults-lantern-58-meadow-quartz"
DOMAIN = "faults.example"


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of a run: the issue's when heavy, shorter for `make test`."""

    contacts: int
    # Every n-th contact is suppressed (half unsubscribed by their link, half by the account).
    suppress_every: int
    relay_refused_seconds: float
    relay_deferring_seconds: float
    postgres_down_seconds: float
    broker_down_seconds: float
    # How long a send may take to finish once its fault is over, and to show no progress at all
    # (no outcome counted, no mail received) before it is judged stuck.
    finish_seconds: float
    stall_seconds: float

    @classmethod
    def from_env(cls, heavy: bool = HEAVY) -> Settings:
        """DEFAULT or HEAVY, with `HERALD_FAULTS_<FIELD>` (e.g. HERALD_FAULTS_CONTACTS) over it."""
        base = HEAVY_SETTINGS if heavy else DEFAULT_SETTINGS
        changes: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            value = os.environ.get(f"HERALD_FAULTS_{item.name.upper()}")
            if value:
                changes[item.name] = type(getattr(base, item.name))(value)
        return dataclasses.replace(base, **changes)


DEFAULT_SETTINGS = Settings(
    contacts=1500,
    suppress_every=40,
    relay_refused_seconds=5,
    relay_deferring_seconds=5,
    postgres_down_seconds=4,
    broker_down_seconds=3,
    finish_seconds=150,
    stall_seconds=15,
)
HEAVY_SETTINGS = Settings(
    contacts=4000,
    suppress_every=25,
    relay_refused_seconds=30,
    relay_deferring_seconds=30,
    postgres_down_seconds=15,
    broker_down_seconds=10,
    finish_seconds=900,
    stall_seconds=120,
)

# Shorter than production so faults resolve in test time: fan-outs taken over after 3 s, deferred
# mail retried after 1 to 5 s, and fan-outs in many small batches so one can be caught half way.
STACK_ENV = {
    "HERALD_ENV": "test",
    "LOG_LEVEL": "INFO",
    "KAFKA_SESSION_TIMEOUT_MS": "3000",
    "SCHEDULER_BATCH_SIZE": "100",
    "SCHEDULER_FANOUT_LEASE_SECONDS": "3",
    "DISPATCHER_RETRY_BASE": "1",
    "DISPATCHER_RETRY_MAX": "5",
}


@contextlib.asynccontextmanager
async def fault_stack() -> AsyncIterator[Stack]:
    """A whole platform on free ports and a data directory of its own, stopped and removed after."""
    data_dir = Path(tempfile.mkdtemp(prefix="herald-faults-"))
    os.chmod(data_dir, 0o755)  # noqa: S103 - readable by PostgreSQL's own user
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            service_ports={name: free_port() for name in SERVICES},
            pg_port=free_port(),
            broker_port=free_port(),
            sink_smtp_port=free_port(),
            sink_http_port=free_port(),
            durable=False,
            kafka_partitions=3,
            env=dict(STACK_ENV),
        )
    )
    try:
        await stack.start(timeout=120)
        yield stack
    finally:
        await stack.stop()
        # HERALD_KEEP_TEST_DATA=1 keeps the logs and data of a run for a post-mortem.
        if os.environ.get("HERALD_KEEP_TEST_DATA") != "1":
            shutil.rmtree(data_dir, ignore_errors=True)


async def eventually(
    check: Callable[[], Awaitable[Any]], what: str, *, timeout: float, interval: float = 0.2
) -> Any:
    """The first truthy result of `check`, polled until `timeout` (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            result = await check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


# -- the user and the audience ---------------------------------------------------------------------


@dataclass
class User:
    """A signed-up, confirmed, logged-in user of the gateway."""

    gateway: httpx.AsyncClient
    user_id: uuid.UUID
    email: str
    headers: dict[str, str]

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.gateway.request(method, path, headers=self.headers, **kwargs)


_CONFIRM_LINK = re.compile(r"\S+/signup/confirm\?token=[^\s\"'<>]+")


async def sign_up(gateway: httpx.AsyncClient, sink: httpx.AsyncClient) -> User:
    """Sign up, confirm from the mail the sink received, log in: what a new user does."""
    # Not under `tag`: the sink is searched by it for the campaign's mail alone.
    name = f"owner{uuid.uuid4().hex[:10]}"
    email = f"{name}@{DOMAIN}"
    response = await gateway.post(
        "/signup", json={"username": name, "email": email, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text

    async def confirmation() -> str | None:
        items = (await sink.get("/api/messages", params={"to": email})).json()["items"]
        for item in items:
            text = (await sink.get(f"/api/messages/{item['id']}")).json()["text"] or ""
            if found := _CONFIRM_LINK.search(text):
                return found[0]
        return None

    link = await eventually(confirmation, "the confirmation mail", timeout=60)
    token = parse_qs(urlparse(link).query)["token"][0]
    confirmed = await gateway.get("/signup/confirm", params={"token": token})
    assert confirmed.status_code == 200, confirmed.text
    tokens = await gateway.post("/login", json={"email": email, "password": PASSWORD})
    assert tokens.status_code == 200, tokens.text
    headers = {"Authorization": f"Bearer {tokens.json()['access_token']}"}
    return User(gateway, uuid.UUID(response.json()["id"]), email, headers)


@dataclass
class Audience:
    list_id: str
    active: list[str]
    suppressed: list[str]


async def make_audience(user: User, stack: Stack, tag: str, settings: Settings) -> Audience:
    """A list of `settings.contacts` contacts; every `suppress_every`-th is then suppressed."""
    response = await user.call("POST", "/lists", json={"name": f"faults {tag}"})
    assert response.status_code == 201, response.text
    list_id = response.json()["id"]
    addresses = [f"{tag}-{n:05d}@{DOMAIN}" for n in range(settings.contacts)]
    ids: dict[str, str] = {}
    for start in range(0, len(addresses), 1000):
        chunk = [
            {"email": a, "first_name": f"R{n}", "list_ids": [list_id]}
            for n, a in enumerate(addresses[start : start + 1000], start)
        ]
        created = await user.call("POST", "/contacts", json=chunk, timeout=120)
        assert created.status_code == 207, created.text
        body = created.json()
        assert body["failed"] == 0, body
        ids.update({i["contact"]["email"]: i["contact"]["id"] for i in body["items"]})
    suppressed = addresses[:: settings.suppress_every]
    signer = LinkSigner.from_spec(stack.secrets["LINK_SIGNING_KEYS"])
    limit = asyncio.Semaphore(8)

    async def suppress(n: int, address: str) -> None:
        async with limit:
            if n % 2:
                # As the recipient does: the one-click link of RFC 8058 from an earlier mail.
                token = signer.sign("unsubscribe", UnsubscribeToken(a=user.user_id, r=address))
                done = await user.gateway.post(
                    f"/unsubscribe/{token}",
                    content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                )
            else:
                done = await user.call(
                    "PATCH", f"/contacts/{ids[address]}", json={"status": "unsubscribed"}
                )
            assert done.status_code == 200, done.text

    await asyncio.gather(*(suppress(n, a) for n, a in enumerate(suppressed)))
    kept = set(suppressed)
    return Audience(list_id, [a for a in addresses if a not in kept], suppressed)


async def compose(user: User, list_id: str) -> str:
    """A personalised list email from the user's confirmed address; its id."""
    body = {
        "subject": 'Fault drill for {{ contact.first_name | default("you") }}',
        "html": (
            "<p>Hello {{ contact.first_name }}, this is a drill.</p>"
            '<p><a href="https://example.com/drill">Read more</a></p>'
            '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
        ),
        "list_ids": [list_id],
        "from_email": user.email,
    }

    async def draft() -> str | None:
        # The sender's confirmation reaches campaign as an event: until then the From is refused.
        response = await user.call("POST", "/compose", json=body)
        if response.status_code == 201:
            email_id: str = response.json()["id"]
            return email_id
        assert response.status_code in (403, 409, 422), response.text
        return None

    result: str = await eventually(draft, "campaign to know the confirmed sender", timeout=60)
    return result


# -- a run ---------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What one scenario's send came to, and every way it fell short (`problems`)."""

    scenario: str
    active: int
    suppressed: int
    status: str = "?"
    queued: int | None = None
    sent: int = 0
    received: int = 0
    duplicates: int = 0
    missing: int = 0
    suppressed_received: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One send under one fault; the scenario drives it through these methods."""

    name: str
    stack: Stack
    settings: Settings
    tag: str
    user: User
    sink: httpx.AsyncClient
    audience: Audience
    email_id: str
    ledger: Ledger
    started: float = 0.0
    # Undo what a scenario changed in the stack, run after the ledger is drawn up.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _watch: asyncio.Task[None] | None = None

    def problem(self, text: str) -> None:
        self.ledger.problems.append(text)

    async def send(self) -> None:
        """POST /send, and watch the status from then on."""
        self.started = time.monotonic()
        response = await self.user.call("POST", "/send", json={"email_id": self.email_id})
        assert response.status_code == 202, response.text
        self._watch = asyncio.create_task(self._watch_status())

    async def delivered(self) -> int:
        """Messages the sink holds for this run's recipients."""
        response = await self.sink.get("/api/messages/count", params={"to": self.tag})
        response.raise_for_status()
        found: int = response.json()["count"]
        return found

    async def wait_delivered(self, share: float, timeout: float = 120) -> int:
        """Wait until `share` of the active recipients have mail; how many have."""
        want = max(1, int(len(self.audience.active) * share))

        async def enough() -> int | None:
            found = await self.delivered()
            return found if found >= want else None

        found: int = await eventually(enough, f"{want} messages", timeout=timeout, interval=0.05)
        return found

    async def fault_came_in_time(self) -> None:
        """Note it if the whole send was through before the fault: it then tested nothing."""
        if await self.delivered() >= len(self.audience.active):
            self.problem("the fault came after every message was delivered: nothing was tested")

    async def email(self) -> dict[str, Any]:
        response = await self.user.call("GET", f"/emails/{self.email_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def _watch_status(self) -> None:
        # Mail reaches the sink before the dispatcher records it as sent, so once the status says
        # `sent`, the sink must already hold every active recipient's copy.
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                email = await self.email()
                if email["status"] == "sent":
                    held = await self.delivered()
                    if held < len(self.audience.active):
                        self.problem(
                            f"status was `sent` while the sink held {held} of"
                            f" {len(self.audience.active)} messages"
                        )
                    return
            await asyncio.sleep(0.25)

    async def restart_dead_services(self) -> None:
        """Note and restart any service that did not live through the fault."""
        dead = [name for name, process in self.stack.services.items() if not process.alive]
        for name in dead:
            self.problem(f"{name} exited during the fault (see {name}.log)")
            module = self.stack.services[name].module
            await self.stack.stop_service(name)
            if name == module:
                await self.stack.start_service(name)
            else:
                port = self.stack.replica_ports.get(name)
                await self.stack.start_service(module, replica=name, port=port)
        if dead:
            await self.stack.wait_ready(120)

    async def finish(self) -> dict[str, Any]:
        """Wait for the final status (or until nothing moved for `stall_seconds`); the email."""
        deadline = time.monotonic() + self.settings.finish_seconds
        email: dict[str, Any] = {}
        progress: tuple[Any, ...] = ()
        moved = time.monotonic()
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                email = await self.email()
                if email["status"] in ("sent", "failed", "cancelled"):
                    break
                now = (email["status"], email["counts"], await self.delivered())
                if now != progress:
                    progress, moved = now, time.monotonic()
                elif time.monotonic() - moved > self.settings.stall_seconds:
                    break  # stuck: the ledger will say where
            await asyncio.sleep(0.3)
        self.ledger.seconds = self.ledger.seconds or time.monotonic() - self.started
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # Anything sent twice has arrived by now (retries here are at most 5 s apart).
        await asyncio.sleep(2)
        return email


async def _sink_messages(sink: httpx.AsyncClient, tag: str) -> list[dict[str, Any]]:
    """Every message the sink holds for `tag`, oldest first."""
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await sink.get(
            "/api/messages", params={"to": tag, "limit": 1000, "after": after}
        )
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        if not items:
            return found
        found += items
        after = items[-1]["id"]


def _message_key(message_id: str | None) -> str:
    """The left part of a Message-ID, without angle brackets: the dispatcher's record id."""
    return (message_id or "").strip().strip("<>").partition("@")[0]


async def _tracking(user: User, email_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Tracking's report of the email and all its recipients (paged)."""
    first: dict[str, Any] = {}
    recipients: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        response = await user.call("GET", f"/tracking/{email_id}", params=params)
        response.raise_for_status()
        page = response.json()
        first = first or page
        recipients += page["recipients"]["items"]
        cursor = page["recipients"]["next_cursor"]
        if not cursor:
            return first, recipients


async def draw_up(run: Run, email: dict[str, Any]) -> None:
    """Set the sink, campaign and tracking against the audience; every mismatch is a problem."""
    ledger, audience = run.ledger, run.audience
    active, suppressed = set(audience.active), set(audience.suppressed)
    messages = await _sink_messages(run.sink, run.tag)
    copies = Counter(rcpt.lower() for m in messages for rcpt in m["rcpt_tos"])
    ids = Counter(_message_key(m["message_id"]) for m in messages)
    received = {a for a in copies if a in active}
    ledger.received = len(received)
    ledger.duplicates = sum(n - 1 for n in copies.values() if n > 1)
    ledger.missing = len(active - received)
    ledger.suppressed_received = len(suppressed & set(copies))
    ledger.status = email.get("status", "?")
    counts = email.get("counts") or {}
    ledger.queued, ledger.sent = counts.get("queued"), counts.get("sent", 0)

    def sample(values: set[str]) -> str:
        return ", ".join(sorted(values)[:3])

    if ledger.missing:
        ledger.problems.append(
            f"{ledger.missing} active recipients got nothing: {sample(active - received)}…"
        )
    if ledger.duplicates:
        twice = {a for a, n in copies.items() if n > 1}
        ledger.problems.append(f"{ledger.duplicates} extra copies, e.g. to {sample(twice)}")
    if ledger.suppressed_received:
        ledger.problems.append(f"{ledger.suppressed_received} suppressed recipients got mail")
    if strangers := set(copies) - active - suppressed:
        ledger.problems.append(f"mail to addresses outside the audience: {sample(strangers)}")
    if [key for key, n in ids.items() if n > 1]:
        ledger.problems.append("a Message-ID arrived more than once")
    if ledger.status != "sent":
        ledger.problems.append(f"the email ended `{ledger.status}`, not `sent`")
    expected = {"queued": len(active), "sent": len(active), "failed": 0}
    if {k: counts.get(k) for k in expected} != expected:
        ledger.problems.append(f"campaign counts {counts} != {expected}")

    report, recipients = await _tracking(run.user, run.email_id)
    by_recipient = {r["recipient"].lower(): r for r in recipients}
    tracking_counts = report["counts"]
    if report["total_recipients"] != len(active) or tracking_counts["sent"] != len(active):
        ledger.problems.append(
            f"tracking: {report['total_recipients']} recipients, {tracking_counts['sent']} sent;"
            f" expected {len(active)}"
        )
    if set(by_recipient) != active:
        ledger.problems.append(
            f"tracking lists {len(by_recipient)} recipients: {len(set(by_recipient) - active)}"
            f" outside the audience, {len(active - set(by_recipient))} of it missing"
        )
    not_sent = {a for a, r in by_recipient.items() if r["status"] != "sent"}
    if not_sent:
        ledger.problems.append(
            f"tracking: {len(not_sent)} recipients not `sent`: {sample(not_sent)}"
        )
    if {_message_key(r["message_id"]) for r in recipients} != set(ids):
        ledger.problems.append("tracking's Message-IDs differ from those the sink received")


async def _await_tracking(run: Run) -> None:
    # Tracking reads outcomes from `email.dispatched` on its own; give it time to catch up.
    async def caught_up() -> bool:
        report, _ = await _tracking(run.user, run.email_id)
        done: bool = report["counts"]["sent"] + report["counts"]["failed"] >= len(
            run.audience.active
        )
        return done

    with contextlib.suppress(AssertionError):
        await eventually(caught_up, "tracking", timeout=30, interval=0.5)


Scenario = Callable[[Run], Awaitable[None]]


async def run_scenario(stack: Stack, settings: Settings, name: str, scenario: Scenario) -> Ledger:
    """Prepare a user, audience and draft; let `scenario` send it under its fault; draw up."""
    tag = f"f{uuid.uuid4().hex[:10]}"
    async with (
        httpx.AsyncClient(base_url=stack.url("gateway"), timeout=60) as gateway,
        httpx.AsyncClient(base_url=stack.sink_url, timeout=60) as sink,
    ):
        user = await sign_up(gateway, sink)
        audience = await make_audience(user, stack, tag, settings)
        email_id = await compose(user, audience.list_id)
        ledger = Ledger(name, len(audience.active), len(audience.suppressed))
        run = Run(name, stack, settings, tag, user, sink, audience, email_id, ledger)
        try:
            await scenario(run)
            await run.restart_dead_services()
            email = await run.finish()
            await _await_tracking(run)
            await draw_up(run, email)
        finally:
            for cleanup in reversed(run.cleanups):
                await cleanup()
    return ledger


async def database(stack: Stack) -> asyncpg.Connection:
    """A connection to the stack's database, to watch state the API does not show."""
    return await asyncpg.connect(stack.database_url)
