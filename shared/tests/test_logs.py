import logging

import orjson

from herald.logs import JsonFormatter, correlation_id


def _format(record: logging.LogRecord) -> dict[str, object]:
    return dict(orjson.loads(JsonFormatter("auth").format(record)))


def test_json_lines_carry_service_correlation_id_and_extras():
    record = logging.makeLogRecord(
        {
            "msg": "sent %d",
            "args": (3,),
            "levelname": "INFO",
            "name": "x",
            "topic": "email.dispatch",
        }
    )
    token = correlation_id.set("req-42")
    try:
        entry = _format(record)
    finally:
        correlation_id.reset(token)
    assert entry["msg"] == "sent 3"
    assert entry["service"] == "auth"
    assert entry["correlation_id"] == "req-42"
    assert entry["topic"] == "email.dispatch"
    assert entry["level"] == "info"


def test_no_correlation_id_outside_a_request():
    entry = _format(logging.makeLogRecord({"msg": "idle", "levelname": "DEBUG"}))
    assert "correlation_id" not in entry
