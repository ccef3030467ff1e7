"""Pure rules of the contacts service: addresses, attributes, cursors, CSV columns and cells."""

from __future__ import annotations

import base64
import binascii
import functools
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from email_validator import EmailNotValidError, validate_email

Status = Literal["active", "unsubscribed", "bounced", "complained"]
Reason = Literal["unsubscribed", "bounced", "complained", "manual"]

MAX_EMAIL = 254
MAX_NAME = 200
MAX_ATTRIBUTE_KEYS = 100
# Serialised as JSON; enough for personalisation, small enough to keep pages and batches light.
MAX_ATTRIBUTES_BYTES = 16 * 1024
ATTRIBUTE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

# A dot-atom local part email-validator accepts unchanged, at a plain ASCII domain (checked once
# per domain by `_domain`); anything else takes the slow path. The dots of the local part are
# checked apart: one flat character class matches several times faster, and an import checks
# every row with it.
_PLAIN_ADDRESS = re.compile(r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64})@([A-Za-z0-9.-]+)")


class InvalidEmail(ValueError):
    """Not an address mail can be sent to; the message says why."""


@functools.lru_cache(maxsize=65_536)
def _domain(domain: str) -> str:
    """The normalised domain, validated once per distinct domain (lists share few domains)."""
    try:
        result = validate_email(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidEmail(str(exc)) from None
    return result.domain


def normalise_email(raw: str) -> str:
    """The address as stored: validated by email-validator, the domain lower-cased."""
    text = raw.strip()
    plain = _PLAIN_ADDRESS.fullmatch(text)
    if plain and len(text) <= MAX_EMAIL:
        local = plain[1]
        if local[0] != "." and local[-1] != "." and ".." not in local:
            return f"{local}@{_domain(plain[2])}"
    if len(text) > MAX_EMAIL * 4:
        raise InvalidEmail("The email address is too long.")
    try:
        return validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidEmail(str(exc)) from None


def email_key(email: str) -> str:
    """What addresses are compared by: case-insensitive, as the unique index is."""
    return email.lower()


def status_for(reason: str | None) -> Status:
    """The status of a contact whose address is suppressed for `reason` (None: not at all)."""
    if reason in ("bounced", "complained"):
        return reason  # type: ignore[return-value]
    if reason is None:
        return "active"
    return "unsubscribed"


def status_after_email_change(current: Status, suppressed_reason: str | None) -> Status:
    """A bounce belongs to the old address; an unsubscribe or complaint belongs to the person."""
    if suppressed_reason is not None:
        return status_for(suppressed_reason)
    return "active" if current == "bounced" else current


def attribute_problem(attributes: Mapping[str, Any]) -> str | None:
    """Why `attributes` cannot be stored, or None: identifier keys, bounded count and size."""
    if len(attributes) > MAX_ATTRIBUTE_KEYS:
        return f"at most {MAX_ATTRIBUTE_KEYS} attributes"
    for key in attributes:
        if not ATTRIBUTE_KEY.match(key):
            return f"attribute name {key[:70]!r} is not an identifier (letters, digits, _)"
    try:
        size = len(orjson.dumps(attributes))
    except TypeError:
        return "attribute values must be JSON"
    if size > MAX_ATTRIBUTES_BYTES:
        return f"attributes take {size} bytes as JSON; at most {MAX_ATTRIBUTES_BYTES}"
    return None


def name_problem(value: str | None) -> str | None:
    if value is not None and len(value) > MAX_NAME:
        return f"at most {MAX_NAME} characters"
    # Names are rendered into subjects and greetings; a line break there could start a header.
    if value is not None and ("\r" in value or "\n" in value):
        return "must be a single line (no CR or LF)"
    return None


# -- cursors ---------------------------------------------------------------------------------


class BadCursor(ValueError):
    """A cursor this service did not hand out."""


def encode_cursor(last_id: uuid.UUID) -> str:
    """An opaque keyset cursor: the last id of a page."""
    return base64.urlsafe_b64encode(b"c1" + last_id.bytes).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> uuid.UUID:
    """The id a cursor from `encode_cursor` names, or BadCursor."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor of this API") from None
    if len(raw) != 18 or not raw.startswith(b"c1"):
        raise BadCursor("not a cursor of this API")
    return uuid.UUID(bytes=raw[2:])


# -- CSV import --------------------------------------------------------------------------------

_EMAIL_NAMES = {"email", "e_mail", "email_address", "mail"}
_FIRST_NAMES = {"first_name", "firstname", "first", "given_name"}
_LAST_NAMES = {"last_name", "lastname", "last", "surname", "family_name"}
Target = str  # "email" | "first_name" | "last_name" | "attributes.<key>" | "ignore"


def _canonical(header: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", header.strip().lower()).strip("_")


class BadColumns(ValueError):
    """The header row (with the caller's mapping) does not say where the addresses are."""


@dataclass(frozen=True)
class ColumnPlan:
    """Which field of each row goes where."""

    width: int
    email: int
    first_name: int | None = None
    last_name: int | None = None
    attributes: tuple[tuple[int, str], ...] = field(default_factory=tuple)


def plan_columns(header: Sequence[str], mapping: Mapping[str, str] | None = None) -> ColumnPlan:
    """Map header names to fields: `mapping` first, then well-known names, else attributes."""
    mapping = mapping or {}
    unknown = set(mapping) - set(header)
    if unknown:
        raise BadColumns(f"columns maps {sorted(unknown)[0]!r}, which the header does not have")
    targets: dict[str, int] = {}
    attributes: list[tuple[int, str]] = []
    for index, name in enumerate(header):
        target = mapping.get(name) or _default_target(name)
        if target == "ignore":
            continue
        if target.startswith("attributes."):
            key = target.removeprefix("attributes.")
            if not ATTRIBUTE_KEY.match(key):
                raise BadColumns(
                    f"column {name[:70]!r} would become attribute {key[:70]!r}, which is not"
                    ' an identifier; map it in `columns` (or to "ignore")'
                )
            if key in (k for _, k in attributes):
                raise BadColumns(f"two columns map to attribute {key!r}")
            attributes.append((index, key))
            continue
        if target not in ("email", "first_name", "last_name"):
            raise BadColumns(f"column {name[:70]!r} maps to unknown target {target[:70]!r}")
        if target in targets:
            raise BadColumns(f"two columns map to {target}")
        targets[target] = index
    if "email" not in targets:
        raise BadColumns("no email column: name one `email` or map it in `columns`")
    if len(attributes) > MAX_ATTRIBUTE_KEYS:
        raise BadColumns(f"at most {MAX_ATTRIBUTE_KEYS} attribute columns")
    return ColumnPlan(
        width=len(header),
        email=targets["email"],
        first_name=targets.get("first_name"),
        last_name=targets.get("last_name"),
        attributes=tuple(attributes),
    )


def _default_target(header: str) -> Target:
    if header.startswith("attributes."):
        return header
    canonical = _canonical(header)
    if canonical in _EMAIL_NAMES:
        return "email"
    if canonical in _FIRST_NAMES:
        return "first_name"
    if canonical in _LAST_NAMES:
        return "last_name"
    return f"attributes.{canonical}" if canonical else "ignore"


@dataclass(frozen=True)
class RowError:
    row: int
    field: str
    message: str

    def as_dict(self) -> dict[str, object]:
        return {"row": self.row, "field": self.field, "message": self.message}


# (row, email, email_key, first_name, last_name, attributes as JSON text)
StagedRow = tuple[int, str, str, str | None, str | None, str]


def stage_row(
    plan: ColumnPlan, row_no: int, fields: Sequence[str], *, nul_free: bool = False
) -> StagedRow | RowError:
    """A CSV record checked and shaped for the staging table, or why it is skipped.

    `nul_free`: the caller knows no cell holds a NUL (an import checks its whole file once).
    """
    if len(fields) != plan.width:
        return RowError(row_no, "row", f"expected {plan.width} fields, found {len(fields)}")
    if not nul_free:
        for cell in fields:
            if "\x00" in cell:
                return RowError(row_no, "row", "contains a NUL character")
    raw_email = fields[plan.email].strip()
    if not raw_email:
        return RowError(row_no, "email", "no address")
    try:
        email = normalise_email(raw_email)
    except InvalidEmail as exc:
        return RowError(row_no, "email", f"{raw_email[:100]!r}: {exc}")
    first = last = None
    if plan.first_name is not None:
        first = fields[plan.first_name].strip() or None
        if first is not None and (problem := name_problem(first)):
            return RowError(row_no, "first_name", problem)
    if plan.last_name is not None:
        last = fields[plan.last_name].strip() or None
        if last is not None and (problem := name_problem(last)):
            return RowError(row_no, "last_name", problem)
    attributes = {}
    for index, key in plan.attributes:
        if value := fields[index].strip():
            attributes[key] = value
    encoded = orjson.dumps(attributes)
    if len(encoded) > MAX_ATTRIBUTES_BYTES:
        return RowError(
            row_no, "attributes", f"{len(encoded)} bytes as JSON; at most {MAX_ATTRIBUTES_BYTES}"
        )
    return (row_no, email, email_key(email), first, last, encoded.decode())


# -- CSV export --------------------------------------------------------------------------------

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
EXPORT_COLUMNS = ("id", "email", "first_name", "last_name", "status", "created_at", "updated_at")
MAX_EXPORT_ATTRIBUTE_COLUMNS = 500


def neutralise(cell: str) -> str:
    """A cell a spreadsheet will show as text, never evaluate as a formula (OWASP's advice)."""
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


def export_header(attribute_keys: Sequence[str]) -> list[str]:
    """Standard columns, then one per attribute (prefixed where a name would collide)."""
    return [*EXPORT_COLUMNS] + [
        f"attributes.{k}" if k in EXPORT_COLUMNS else k for k in attribute_keys
    ]


def export_cell(value: object) -> str:
    """An attribute or field as CSV text: strings as they are, other JSON as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
