"""The dispatcher's rules, without I/O: addresses, relay URLs, outcomes, retries and rates."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import unquote, urlsplit

Status = Literal["sent", "deferred", "failed"]
# Where in the SMTP dialogue a reply came: it decides what a 5xx means.
Stage = Literal["connect", "mail", "rcpt", "data", "end"]

# What a message record can be in. queued -> sending -> sent | deferred | failed; deferred ->
# sending again when due. A `sending` record belongs to the process that claimed it.
STATES = ("queued", "sending", "sent", "deferred", "failed")

MAX_REPLY_LENGTH = 1000
# What the record says when its process died after handing the message over (see delivery.py).
ASSUMED_ACCEPTED = (
    "no reply recorded: the dispatcher stopped after the relay had the whole message;"
    " counted as accepted"
)


class InvalidAddress(ValueError):
    """An address we cannot put into an SMTP envelope."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """An address as the envelope and the header carry it."""

    address: str  # domain in ASCII (IDNA); the local part as given
    smtputf8: bool  # the local part is not ASCII: the relay must offer SMTPUTF8


# RFC 5321 forbids these anywhere in a path; we also refuse what could break a header.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>()\[\]\\,;:\"]")


# Nearly every address: dot-atom ASCII local part, host name domain. Checked in one match.
_PLAIN_ADDRESS = re.compile(
    r"(?=.{1,254}$)(?=[^@]{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def mailbox(address: str) -> Mailbox:
    """Check an address is deliverable by SMTP and put its domain into ASCII."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return Mailbox(address=address, smtputf8=False)
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress("not an address")
    if len(address) > 254 or len(local) > 64:
        raise InvalidAddress("too long")
    if _FORBIDDEN.search(local) or _FORBIDDEN.search(domain) or "@" in local:
        raise InvalidAddress("characters an SMTP address cannot carry")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidAddress("dots misplaced in the local part")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidAddress("domain is not a valid internationalised name") from None
    labels = domain.split(".")
    if len(labels) < 2 or not all(
        0 < len(label) <= 63 and re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", label)
        for label in labels
    ):
        raise InvalidAddress("domain is not a host name")
    return Mailbox(address=f"{local}@{domain}", smtputf8=not local.isascii())


def dedupe_key(address: str) -> str:
    """What makes two recipients of one email the same person."""
    return address.strip().lower()


def domain_of(address: str) -> str:
    """The part after the last @, lower-cased."""
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True)
class RelayTarget:
    """Where and how to reach the relay, read from `SMTP_URL`."""

    host: str
    port: int
    tls: Literal["none", "starttls", "implicit"]
    username: str | None = None
    password: str | None = None


_SCHEMES = {"smtp": ("none", 25), "smtp+starttls": ("starttls", 587), "smtps": ("implicit", 465)}


def relay_target(url: str) -> RelayTarget:
    """Parse `smtp://`, `smtp+starttls://` or `smtps://[user[:password]@]host[:port]`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError("SMTP_URL must start with smtp://, smtp+starttls:// or smtps://")
    if not parts.hostname:
        raise ValueError("SMTP_URL names no host")
    tls, default_port = _SCHEMES[scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError("SMTP_URL has an invalid port") from None
    return RelayTarget(
        host=parts.hostname,
        port=port,
        tls=tls,  # type: ignore[arg-type]
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a reply means for the message: its new status and whether the address bounced."""

    status: Status
    hard_bounce: bool = False


def judge(code: int | None, stage: Stage) -> Verdict:
    """The outcome of an attempt from the relay's reply (None: no reply, connection trouble).

    2xx at the end of DATA is delivery; 5xx is permanent; anything else (4xx, timeouts, lost
    connections, nonsense) is worth another try. A 5xx names the recipient's address as bad
    only when it answered RCPT or the end of DATA: a refused MAIL FROM or DATA command is about
    us, not the address, so it must not get the recipient suppressed.
    """
    if code is not None and 200 <= code < 300 and stage == "end":
        return Verdict("sent")
    if code is not None and 500 <= code < 600:
        return Verdict("failed", hard_bounce=stage in ("rcpt", "end"))
    return Verdict("deferred")


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float
    max_seconds: float
    horizon_seconds: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before attempt `attempt + 1`: doubling from `base`, capped, jittered.

        The jitter draws from the upper half of the step so that retries of a big send spread
        out instead of returning to the relay all at once, while never coming back sooner than
        half the step.
        """
        step = min(self.max_seconds, self.base_seconds * 2 ** max(attempt - 1, 0))
        return (rng or random).uniform(step / 2, step)

    def next_attempt(
        self, *, attempt: int, queued_at: datetime, now: datetime, rng: random.Random | None = None
    ) -> datetime | None:
        """When to try again after a deferral, or None when that would pass the horizon."""
        due = now + timedelta(seconds=self.delay(attempt, rng))
        if (due - queued_at).total_seconds() > self.horizon_seconds:
            return None
        return due


def clean_reply(text: str) -> str:
    """A relay's reply as we store and publish it: one line, bounded."""
    return " ".join(text.split())[:MAX_REPLY_LENGTH]


# How the reply of a message whose retries ran out starts (`store.requeue_given_up` finds
# them by it).
GAVE_UP = "gave up after "


def gave_up_reply(attempts: int, last_reply: str) -> str:
    """The reply recorded when deferrals reach the retry horizon."""
    return clean_reply(f"{GAVE_UP}{attempts} attempts; last: {last_reply}")


def retryable(status: str, reply: str | None) -> bool:
    """Whether a failure may be cured by trying again later: its retries ran out on temporary
    trouble (4xx, timeouts, lost connections), as opposed to a refusal for good (5xx) or a
    message that cannot be built or addressed."""
    return status == "failed" and reply is not None and reply.startswith(GAVE_UP)


class Pacer:
    """Spaces events `1/rate` seconds apart, letting `burst` of them through at once (GCRA).

    Time is passed in, so the rule is testable; the caller sleeps or postpones as told.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least one")
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._theoretical = float("-inf")

    def reserve(self, now: float) -> float:
        """Book the next slot; returns how many seconds from `now` it is (0: go now)."""
        start = max(self._theoretical - self._tolerance, now)
        self._theoretical = max(self._theoretical, now) + self._interval
        return start - now

    def busy(self, now: float) -> bool:
        """Whether the next slot lies in the future."""
        return self._theoretical - self._tolerance > now
