"""Pure rules of tracking: how each recipient's state moves, what that adds to the roll-ups, rates.

Counts are per recipient state, not per event: an outcome or notification that arrives twice
(redelivered under another event id) finds the state already moved and adds nothing.

- `sent` / `failed`: the relay's final answer (first one wins, but a failure moves on when a
  later attempt retries it: the totals then count the recipient's new state, while the buckets
  keep the failure in the hour it happened); `deferred` in `email_stats` is recipients waiting
  for a retry now, in the hourly/daily buckets it is deferrals that happened.
- `delivered`: sent and not bounced since (a later bounce takes it back from the hour it was
  sent in); `confirmed`: the provider reported the delivery (SES Delivery, SendGrid delivered).
- `bounced` counts recipients with any bounce, `hard_bounced` those with a permanent one.
- `opens` / `clicks` count every fetch; `unique_*` count recipients (first open, first click).
  A click without a recorded open (images blocked) counts as the recipient's first open too.
  `human_*` are the same figures without machine activity.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    import asyncpg

COUNTERS = (
    "sent",
    "failed",
    "deferred",
    "delivered",
    "confirmed",
    "bounced",
    "hard_bounced",
    "complained",
    "unsubscribed",
    "opens",
    "human_opens",
    "unique_opens",
    "unique_human_opens",
    "clicks",
    "human_clicks",
    "unique_clicks",
    "unique_human_clicks",
)
LINK_COUNTERS = ("clicks", "human_clicks", "unique_clicks", "unique_human_clicks")

Scope = Literal["all", "stats", "buckets", "link"]
K = TypeVar("K")
Status = Literal["queued", "deferred", "sent", "failed"]


def normalize_message_id(value: str) -> str:
    """A Message-ID without its angle brackets or surrounding space, as we store it."""
    return value.strip().strip("<>").strip()


def message_keys(value: str) -> list[str]:
    """The ids a provider's Message-ID may be stored under: itself, and its local part (the
    dispatcher names a message by the id it puts before the `@` of its Message-ID header)."""
    local = value.split("@", 1)[0]
    return [value, local] if local and local != value else [value]


def normalize_address(value: str) -> str:
    return value.strip().lower()


@dataclass(frozen=True, slots=True)
class Activity:
    """One open or click as answered: which message, when, by what, and whether a machine's.

    `id` is made when it is answered, so writing it twice (a retried flush) counts it once.
    """

    id: uuid.UUID
    kind: Literal["open", "click"]
    source: str
    message_id: str
    email_id: uuid.UUID
    account_id: uuid.UUID
    at: datetime
    reason: str | None = None
    user_agent: str | None = None
    ip: str | None = None
    link_index: int | None = None
    url: str | None = None

    @property
    def machine(self) -> bool:
        return self.reason is not None


@dataclass(frozen=True)
class Delta:
    """A change to the roll-ups: `all` updates an email's totals and its buckets at `at`,
    `stats` only its totals, `buckets` only the buckets, `link` one link's figures."""

    scope: Scope
    email_id: uuid.UUID
    account_id: uuid.UUID
    at: datetime
    counts: Mapping[str, int]
    link_index: int | None = None
    url: str | None = None


@dataclass
class EmailSum:
    """What one transaction adds to an email's summed buckets, and the hours it touched (its
    links' included): the bounds say when a report may read the email as one row."""

    account_id: uuid.UUID
    first_hour: datetime
    last_hour: datetime
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class Tables:
    """Deltas summed per roll-up row, ready to write."""

    stats: dict[uuid.UUID, tuple[uuid.UUID, Counter[str]]] = field(default_factory=dict)
    email_hourly: dict[tuple[uuid.UUID, datetime], tuple[uuid.UUID, Counter[str]]] = field(
        default_factory=dict
    )
    email_daily: dict[tuple[uuid.UUID, date], tuple[uuid.UUID, Counter[str]]] = field(
        default_factory=dict
    )
    account_hourly: dict[tuple[uuid.UUID, datetime], Counter[str]] = field(default_factory=dict)
    link_stats: dict[tuple[uuid.UUID, int], tuple[uuid.UUID, str, Counter[str]]] = field(
        default_factory=dict
    )
    link_hourly: dict[tuple[uuid.UUID, int, datetime], tuple[uuid.UUID, Counter[str]]] = field(
        default_factory=dict
    )
    link_daily: dict[tuple[uuid.UUID, int, date], tuple[uuid.UUID, Counter[str]]] = field(
        default_factory=dict
    )
    email_sums: dict[uuid.UUID, EmailSum] = field(default_factory=dict)


class Rollup:
    """Collects the roll-up changes of one transaction, summed per row as they come: a batch of
    thousands of opens of one email touches a handful of rows, so it is kept as that many."""

    def __init__(self) -> None:
        # (scope, email, account, UTC hour number, link, url) -> counter changes.
        self._sums: dict[_RowKey, dict[str, int]] = {}

    def add(
        self,
        scope: Scope,
        email_id: uuid.UUID,
        account_id: uuid.UUID,
        at: datetime,
        *,
        link_index: int | None = None,
        url: str | None = None,
        **counts: int,
    ) -> None:
        """Add `counts` (counter name → change) to the row `at` falls in; zeros are left out."""
        key = (scope, email_id, account_id, int(at.timestamp()) // 3600, link_index, url)
        target = self._sums.get(key)
        if target is None:
            target = self._sums[key] = {}
        for name, n in counts.items():
            if n:
                target[name] = target.get(name, 0) + n

    def extend(self, deltas: Iterable[Delta]) -> None:
        for d in deltas:
            self.add(
                d.scope,
                d.email_id,
                d.account_id,
                d.at,
                link_index=d.link_index,
                url=d.url,
                **d.counts,
            )

    @property
    def deltas(self) -> list[Delta]:
        """The summed changes, one per row and hour (stamped with the hour's start)."""
        return [
            Delta(scope, email_id, account_id, _hour(stamp), changed, link_index, url)
            for (scope, email_id, account_id, stamp, link_index, url), counts in self._sums.items()
            if (changed := {name: n for name, n in counts.items() if n})
        ]

    def __len__(self) -> int:
        return len(self.deltas)

    def tables(self) -> Tables:
        """The changes per roll-up table and row."""
        t = Tables()
        for (scope, email_id, account_id, stamp, link_index, url), counts in self._sums.items():
            hour = _hour(stamp)
            day = hour.date()
            if scope == "link":
                assert link_index is not None
                _bump3(t.link_stats, (email_id, link_index), account_id, url or "", counts)
                _bump(t.link_hourly, (email_id, link_index, hour), account_id, counts)
                _bump(t.link_daily, (email_id, link_index, day), account_id, counts)
                _span(t.email_sums, email_id, account_id, hour)
                continue
            if scope in ("all", "stats"):
                _bump(t.stats, email_id, account_id, counts)
            if scope in ("all", "buckets"):
                _bump(t.email_hourly, (email_id, hour), account_id, counts)
                _bump(t.email_daily, (email_id, day), account_id, counts)
                _add(t.account_hourly.setdefault((account_id, hour), Counter()), counts)
                _add(_span(t.email_sums, email_id, account_id, hour).counts, counts)
        return t


_RowKey = tuple[Scope, uuid.UUID, uuid.UUID, int, int | None, str | None]


def _hour(stamp: int) -> datetime:
    return datetime.fromtimestamp(stamp * 3600, UTC)


def _add(target: Counter[str], counts: Mapping[str, int]) -> None:
    # Plain item updates: Counter.update's generality costs more than the sums here.
    for name, n in counts.items():
        target[name] = target.get(name, 0) + n


def _span(
    sums: dict[uuid.UUID, EmailSum], email_id: uuid.UUID, account_id: uuid.UUID, hour: datetime
) -> EmailSum:
    entry = sums.get(email_id)
    if entry is None:
        entry = sums[email_id] = EmailSum(account_id, hour, hour)
    elif hour < entry.first_hour:
        entry.first_hour = hour
    elif hour > entry.last_hour:
        entry.last_hour = hour
    return entry


def _bump(
    table: dict[K, tuple[uuid.UUID, Counter[str]]],
    key: K,
    account_id: uuid.UUID,
    counts: Mapping[str, int],
) -> None:
    entry = table.get(key)
    if entry is None:
        entry = table[key] = (account_id, Counter())
    _add(entry[1], counts)


def _bump3(
    table: dict[tuple[uuid.UUID, int], tuple[uuid.UUID, str, Counter[str]]],
    key: tuple[uuid.UUID, int],
    account_id: uuid.UUID,
    url: str,
    counts: Mapping[str, int],
) -> None:
    entry = table.get(key)
    if entry is None:
        entry = table[key] = (account_id, url, Counter())
    _add(entry[2], counts)


@dataclass
class Recipient:
    """One message's state, as stored in `recipients`."""

    message_id: str
    email_id: uuid.UUID
    account_id: uuid.UUID
    recipient: str | None = None
    contact_id: uuid.UUID | None = None
    status: Status = "queued"
    attempts: int = 0
    smtp_code: int | None = None
    smtp_reply: str | None = None
    sent_at: datetime | None = None
    confirmed_at: datetime | None = None
    provider_status: str | None = None
    bounce: Literal["soft", "hard"] | None = None
    bounced_at: datetime | None = None
    bounce_detail: str | None = None
    complained_at: datetime | None = None
    unsubscribed_at: datetime | None = None
    opens: int = 0
    human_opens: int = 0
    first_open_at: datetime | None = None
    first_human_open_at: datetime | None = None
    clicks: int = 0
    human_clicks: int = 0
    first_click_at: datetime | None = None
    first_human_click_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | asyncpg.Record) -> Recipient:
        return cls(**{name: row[name] for name in RECIPIENT_COLUMNS})

    def as_row(self) -> tuple[object, ...]:
        """Field values in `RECIPIENT_COLUMNS` order."""
        return tuple(getattr(self, name) for name in RECIPIENT_COLUMNS)


RECIPIENT_COLUMNS = tuple(f.name for f in fields(Recipient))


@dataclass
class LinkState:
    """One recipient's clicks on one link."""

    clicks: int = 0
    human_clicks: int = 0
    first_click_at: datetime | None = None
    first_human_click_at: datetime | None = None


def record_outcome(
    r: Recipient,
    rollup: Rollup,
    *,
    status: Literal["sent", "deferred", "failed"],
    attempt: int,
    at: datetime,
    smtp_code: int | None,
    smtp_reply: str | None,
) -> bool:
    """Apply the relay's answer to one attempt; False when it changes nothing (a repeat)."""
    if r.status == "sent":
        return False
    if r.status == "failed":
        # Only a later attempt moves a failure on (the sender retried the failed recipients);
        # the failure published again under the same attempt is a repeat.
        if attempt <= r.attempts:
            return False
        # Totals count where the recipient stands now; the buckets keep the failure in the
        # hour it happened.
        rollup.add("stats", r.email_id, r.account_id, at, failed=-1)
        r.status = "queued"
    if status == "deferred":
        if attempt <= r.attempts and r.status == "deferred":
            return False
        rollup.add("stats", r.email_id, r.account_id, at, deferred=int(r.status != "deferred"))
        rollup.add("buckets", r.email_id, r.account_id, at, deferred=1)
        r.status, r.attempts = "deferred", max(attempt, r.attempts)
        r.smtp_code, r.smtp_reply = smtp_code, smtp_reply
        return True
    if r.status == "deferred":
        rollup.add("stats", r.email_id, r.account_id, at, deferred=-1)
    sent = status == "sent"
    rollup.add(
        "all",
        r.email_id,
        r.account_id,
        at,
        sent=int(sent),
        failed=int(not sent),
        delivered=int(sent and r.bounce is None),
    )
    if sent:
        r.sent_at = at
    r.status, r.attempts = status, max(attempt, r.attempts)
    r.smtp_code, r.smtp_reply = smtp_code, smtp_reply
    return True


def record_bounce(
    r: Recipient, rollup: Rollup, *, hard: bool, at: datetime, detail: str | None
) -> bool:
    """Apply a bounce; True when it is news (first bounce, or a soft one turned hard)."""
    if r.bounce == "hard" or (r.bounce == "soft" and not hard):
        return False
    first = r.bounce is None
    rollup.add("all", r.email_id, r.account_id, at, bounced=int(first), hard_bounced=int(hard))
    if first and r.status == "sent" and r.sent_at is not None:
        rollup.add("all", r.email_id, r.account_id, r.sent_at, delivered=-1)
    r.bounce = "hard" if hard else "soft"
    r.bounced_at = at
    r.bounce_detail = detail[:1000] if detail else None
    r.provider_status = "bounced"
    return True


def record_confirmation(r: Recipient, rollup: Rollup, *, at: datetime) -> bool:
    """The provider delivered the message; True the first time."""
    if r.confirmed_at is not None:
        return False
    rollup.add("all", r.email_id, r.account_id, at, confirmed=1)
    r.confirmed_at = at
    r.provider_status = "delivered"
    return True


def record_complaint(r: Recipient, rollup: Rollup, *, at: datetime) -> bool:
    """The recipient marked the message as spam; True the first time."""
    if r.complained_at is not None:
        return False
    rollup.add("all", r.email_id, r.account_id, at, complained=1)
    r.complained_at = at
    r.provider_status = "complained"
    return True


def record_open(r: Recipient, rollup: Rollup, *, at: datetime, machine: bool) -> None:
    """One fetch of the pixel."""
    human = not machine
    first = r.first_open_at is None
    first_human = human and r.first_human_open_at is None
    rollup.add(
        "all",
        r.email_id,
        r.account_id,
        at,
        opens=1,
        human_opens=int(human),
        unique_opens=int(first),
        unique_human_opens=int(first_human),
    )
    r.opens += 1
    r.human_opens += int(human)
    if first:
        r.first_open_at = at
    if first_human:
        r.first_human_open_at = at


def record_click(
    r: Recipient,
    link: LinkState,
    rollup: Rollup,
    *,
    at: datetime,
    machine: bool,
    link_index: int,
    url: str,
) -> None:
    """One followed link; a click without an open before it implies the open."""
    human = not machine
    implied_open = r.first_open_at is None
    implied_human_open = human and r.first_human_open_at is None
    first = r.first_click_at is None
    first_human = human and r.first_human_click_at is None
    rollup.add(
        "all",
        r.email_id,
        r.account_id,
        at,
        clicks=1,
        human_clicks=int(human),
        unique_clicks=int(first),
        unique_human_clicks=int(first_human),
        unique_opens=int(implied_open),
        unique_human_opens=int(implied_human_open),
    )
    r.clicks += 1
    r.human_clicks += int(human)
    if implied_open:
        r.first_open_at = at
    if implied_human_open:
        r.first_human_open_at = at
    if first:
        r.first_click_at = at
    if first_human:
        r.first_human_click_at = at
    link_first = link.first_click_at is None
    link_first_human = human and link.first_human_click_at is None
    rollup.add(
        "link",
        r.email_id,
        r.account_id,
        at,
        link_index=link_index,
        url=url,
        clicks=1,
        human_clicks=int(human),
        unique_clicks=int(link_first),
        unique_human_clicks=int(link_first_human),
    )
    link.clicks += 1
    link.human_clicks += int(human)
    if link_first:
        link.first_click_at = at
    if link_first_human:
        link.first_human_click_at = at


def queued(total_recipients: int | None, counts: Mapping[str, int]) -> int:
    """Recipients handed out but without any answer from the relay yet."""
    if total_recipients is None:
        return 0
    answered = counts.get("sent", 0) + counts.get("failed", 0) + counts.get("deferred", 0)
    return max(total_recipients - answered, 0)


RATES = (
    "delivery_rate",
    "bounce_rate",
    "complaint_rate",
    "unsubscribe_rate",
    "open_rate",
    "human_open_rate",
    "click_rate",
    "human_click_rate",
    "click_to_open_rate",
    "human_click_to_open_rate",
)


def rates(c: Mapping[str, Any]) -> dict[str, float | None]:
    """The rates reports show; None where the base is zero.

    Delivery and bounce rates are over recipients the relay answered finally (sent + failed);
    opens, clicks, complaints and unsubscribes are over delivered ones; click-to-open is unique
    clickers over unique openers.
    """
    # One test per base rather than one call per rate: a report works out these for every
    # email row it shows.
    get = c.get
    attempted = get("sent", 0) + get("failed", 0)
    delivered = get("delivered", 0)
    opened, human_opened = get("unique_opens", 0), get("unique_human_opens", 0)
    clicked, human_clicked = get("unique_clicks", 0), get("unique_human_clicks", 0)
    delivery = bounce = complaint = unsubscribe = None
    open_rate = human_open = click = human_click = None
    if attempted > 0:
        delivery = round(delivered / attempted, 4)
        bounce = round(get("bounced", 0) / attempted, 4)
    if delivered > 0:
        complaint = round(get("complained", 0) / delivered, 4)
        unsubscribe = round(get("unsubscribed", 0) / delivered, 4)
        open_rate = round(opened / delivered, 4)
        human_open = round(human_opened / delivered, 4)
        click = round(clicked / delivered, 4)
        human_click = round(human_clicked / delivered, 4)
    return {
        "delivery_rate": delivery,
        "bounce_rate": bounce,
        "complaint_rate": complaint,
        "unsubscribe_rate": unsubscribe,
        "open_rate": open_rate,
        "human_open_rate": human_open,
        "click_rate": click,
        "human_click_rate": human_click,
        "click_to_open_rate": round(clicked / opened, 4) if opened > 0 else None,
        "human_click_to_open_rate": (
            round(human_clicked / human_opened, 4) if human_opened > 0 else None
        ),
    }


class PeriodError(ValueError):
    """A report period that cannot be served; `field` names the parameter at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


Interval = Literal["hour", "day"]

MAX_DAYS = 400
MAX_HOURLY_DAYS = 31
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class Period:
    """A report's span in UTC, whole hours, `end` exclusive, and how its series is bucketed."""

    start: datetime
    end: datetime
    interval: Interval
    tz: ZoneInfo


def _instant(value: date | datetime, tz: ZoneInfo, *, end: bool) -> datetime:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=tz)
        return aware.astimezone(UTC)
    # A date means the whole local day: `to` includes it.
    day = value + timedelta(days=1) if end else value
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


def _floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(at: datetime) -> datetime:
    floor = _floor_hour(at)
    return floor if floor == at else floor + timedelta(hours=1)


def resolve_period(
    *,
    start: date | datetime | None,
    end: date | datetime | None,
    interval: Interval | None,
    tz: ZoneInfo,
    now: datetime,
) -> Period:
    """The period `from`/`to` ask for (dates are whole days in the account's timezone).

    Defaults: the last 30 local days up to now; hourly buckets for spans up to two days.
    """
    stop = _instant(end, tz, end=True) if end is not None else now.astimezone(UTC)
    if isinstance(start, datetime):
        begin = _floor_hour(_instant(start, tz, end=False))
    else:
        local_today = stop.astimezone(tz).date()
        first_day = start or local_today - timedelta(days=DEFAULT_DAYS - 1)
        # Roll-ups are hourly and an hour counts on the local day it starts on: where local
        # midnight falls mid-hour (+05:30), the hour straddling it belongs to the day before.
        begin = _ceil_hour(_instant(first_day, tz, end=False))
    stop = _ceil_hour(stop)
    if begin >= stop:
        raise PeriodError("from", "`from` must be before `to`")
    span = stop - begin
    if span > timedelta(days=MAX_DAYS):
        raise PeriodError("from", f"a report spans at most {MAX_DAYS} days")
    chosen: Interval = interval or ("hour" if span <= timedelta(days=2) else "day")
    if chosen == "hour" and span > timedelta(days=MAX_HOURLY_DAYS):
        raise PeriodError("interval", f"hourly series span at most {MAX_HOURLY_DAYS} days")
    return Period(begin, stop, chosen, tz)


@dataclass(frozen=True)
class Split:
    """Which buckets cover a period: whole UTC days from the daily roll-ups, the rest hourly."""

    days: tuple[date, date] | None
    hours: tuple[tuple[datetime, datetime], ...]


def split(period: Period) -> Split:
    first_day = _ceil_day(period.start)
    last_day = datetime.combine(period.end.date(), time(), tzinfo=UTC)
    if first_day >= last_day:
        return Split(None, ((period.start, period.end),))
    edges = tuple((a, b) for a, b in ((period.start, first_day), (last_day, period.end)) if a < b)
    return Split((first_day.date(), last_day.date()), edges)


def _ceil_day(at: datetime) -> datetime:
    floor = datetime.combine(at.date(), time(), tzinfo=UTC)
    return floor if floor == at else floor + timedelta(days=1)


def series_keys(period: Period) -> list[datetime | date]:
    """Every bucket of the series, in order: UTC hours, or local days."""
    if period.interval == "hour":
        hours = int((period.end - period.start).total_seconds() // 3600)
        return [period.start + timedelta(hours=n) for n in range(hours)]
    # Each hour counts on the local day it starts on, the last one included.
    first = period.start.astimezone(period.tz).date()
    last = (period.end - timedelta(hours=1)).astimezone(period.tz).date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def bucket_label(key: datetime | date, tz: ZoneInfo) -> str:
    """An hour as local time with its offset, a day as its local date."""
    if isinstance(key, datetime):
        return key.astimezone(tz).isoformat()
    return key.isoformat()


def csv_cell(value: object) -> object:
    """A CSV field; text that a spreadsheet would run as a formula is quoted with `'`."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def zone(name: str | None) -> ZoneInfo:
    """The named timezone, or UTC when it is unknown."""
    try:
        return ZoneInfo(name or "UTC")
    except (ValueError, KeyError, OSError):
        return ZoneInfo("UTC")


# Characters left as they are in a redirect target; anything else (spaces, non-ASCII) is
# percent-encoded so the Location header stays valid.
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~-._"


def redirect_target(url: str) -> str | None:
    """Where a click may be sent: an http(s) URL with a host, or None (never redirect)."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return quote(url.strip(), safe=_URL_SAFE)


def encode_cursor(address: str) -> str:
    """An opaque page cursor for the per-recipient list (the last address shown)."""
    return base64.urlsafe_b64encode(address.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The address a cursor stands for; ValueError when it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not a valid cursor") from None
