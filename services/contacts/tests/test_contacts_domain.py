"""The contacts service's pure rules: addresses, attributes, cursors, CSV columns and cells."""

import uuid

import orjson
import pytest
from email_validator import EmailNotValidError, validate_email

from contacts import domain

ADDRESSES = [
    "Ada@Example.COM",
    "a.b-c+tag@sub.example.org",
    "o'brien&co@example.com",
    "x@b.c",
    "a..b@example.com",
    ".a@example.com",
    "a.@example.com",
    "a@localhost",
    "a@b.test",
    "a@-b.com",
    "a@b_c.com",
    "a@1.2.3.4",
    "a b@example.com",
    '"quoted"@example.com',
    "ünïcode@exämple.com",
    "A@XN--BCHER-KVA.example",
    "@example.com",
    "no-at-sign",
    "x" * 65 + "@example.com",
    "x" * 64 + "@example.com",
    "a.b.@example.com",
    "a...b@example.com",
    "-@example.com",
    "a@example..com",
    "a@.example.com",
    "a@example.com.",
    "a@@example.com",
    "a@b@example.com",
    "a@" + "b" * 64 + ".com",
    "a@" + ".".join(["b" * 60] * 5) + ".com",
]


@pytest.mark.parametrize("address", ADDRESSES)
def test_the_fast_path_agrees_with_email_validator(address: str):
    try:
        expected: str | None = validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError:
        expected = None
    try:
        got: str | None = domain.normalise_email(address)
    except domain.InvalidEmail:
        got = None
    assert got == expected


def test_normalising_lower_cases_only_the_domain():
    assert domain.normalise_email("  Ada@Example.COM ") == "Ada@example.com"
    assert domain.email_key("Ada@example.com") == "ada@example.com"


def test_statuses_follow_suppression_reasons():
    assert domain.status_for(None) == "active"
    assert domain.status_for("manual") == "unsubscribed"
    assert domain.status_for("bounced") == "bounced"
    assert domain.status_after_email_change("bounced", None) == "active"
    assert domain.status_after_email_change("unsubscribed", None) == "unsubscribed"
    assert domain.status_after_email_change("active", "complained") == "complained"


def test_attributes_are_bounded_identifiers():
    assert domain.attribute_problem({"plan": "pro", "_n2": [1, {"a": None}]}) is None
    assert "identifier" in (domain.attribute_problem({"2x": 1}) or "")
    assert "identifier" in (domain.attribute_problem({"a-b": 1}) or "")
    assert "bytes" in (domain.attribute_problem({"a": "x" * domain.MAX_ATTRIBUTES_BYTES}) or "")
    many = {f"k{i}": i for i in range(domain.MAX_ATTRIBUTE_KEYS + 1)}
    assert domain.attribute_problem(many) is not None


def test_cursors_round_trip_and_refuse_strangers():
    some_id = uuid.uuid4()
    assert domain.decode_cursor(domain.encode_cursor(some_id)) == some_id
    for bad in ["", "abc", "!!!", domain.encode_cursor(some_id)[:-2]]:
        with pytest.raises(domain.BadCursor):
            domain.decode_cursor(bad)


def test_columns_map_by_name_by_mapping_and_to_attributes():
    plan = domain.plan_columns(["E-Mail", "First Name", "Surname", "Plan", "attributes.email"])
    assert (plan.email, plan.first_name, plan.last_name) == (0, 1, 2)
    assert plan.attributes == ((3, "plan"), (4, "email"))
    mapped = domain.plan_columns(
        ["Adresse", "Vorname", "x"], {"Adresse": "email", "Vorname": "first_name", "x": "ignore"}
    )
    assert (mapped.email, mapped.first_name, mapped.attributes) == (0, 1, ())


@pytest.mark.parametrize(
    ("header", "mapping", "message"),
    [
        (["name"], None, "no email column"),
        (["email", "mail"], None, "two columns map to email"),
        (["email", "2024"], None, "not an identifier"),
        (["email"], {"other": "email"}, "does not have"),
        (["email", "x"], {"x": "phone"}, "unknown target"),
        (["email", "x", "y"], {"x": "attributes.a", "y": "attributes.a"}, "two columns"),
    ],
)
def test_bad_columns_say_why(header: list[str], mapping: dict[str, str] | None, message: str):
    with pytest.raises(domain.BadColumns, match=message):
        domain.plan_columns(header, mapping)


def test_rows_are_checked_and_shaped_for_staging():
    plan = domain.plan_columns(["email", "first_name", "last_name", "plan"])
    staged = domain.stage_row(plan, 2, [" Ada@Example.com ", "Ada", "", "pro"])
    assert staged == (2, "Ada@example.com", "ada@example.com", "Ada", None, '{"plan":"pro"}')
    cases = [
        (["a@example.com", "x"], "row", "expected 4 fields"),
        (["", "x", "y", "z"], "email", "no address"),
        (["nope", "x", "y", "z"], "email", "'nope'"),
        (["a@example.com", "x" * 201, "", ""], "first_name", "at most"),
        (["a@example.com", "a\x00", "", ""], "row", "NUL"),
        (["a@example.com", "Ann\r\nBcc: x@example.com", "", ""], "first_name", "single line"),
        (["a@example.com", "", "Lee\nX-Injected: 1", ""], "last_name", "single line"),
    ]
    for fields, field, message in cases:
        error = domain.stage_row(plan, 7, fields)
        assert isinstance(error, domain.RowError)
        assert (error.row, error.field) == (7, field)
        assert message in error.message
    wide = domain.plan_columns(["email", "note"])
    too_big = domain.stage_row(wide, 3, ["a@example.com", "x" * domain.MAX_ATTRIBUTES_BYTES])
    assert isinstance(too_big, domain.RowError)
    assert too_big.field == "attributes"


def test_export_cells_cannot_run_as_formulas():
    for risky in ["=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx"]:
        assert domain.neutralise(risky) == "'" + risky
    assert domain.neutralise("plain") == "plain"
    assert domain.export_header(["plan", "status"])[-2:] == ["plan", "attributes.status"]
    assert domain.export_cell(None) == ""
    assert domain.export_cell("x") == "x"
    assert orjson.loads(domain.export_cell({"a": [1]})) == {"a": [1]}
