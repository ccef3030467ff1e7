"""Examples for the merged API document, where a service gave a schema but no example.

Built from the schema itself: a field's own `examples`, `default`, `const` or first `enum`
value where it has one, else a plain value of its type and format within its bounds. Objects
carry their required fields and any optional one that declares an example, so the result
validates against the schema and reads like a real request (Swagger UI's "Try it out" starts
from it; schemathesis sends it in its examples phase).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_REF_PREFIX = "#/components/schemas/"
_MAX_DEPTH = 8
_FORMATS = {
    "email": "ada@example.com",
    "uuid": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    "date-time": "2030-01-01T09:00:00Z",
    "date": "2030-01-01",
    "time": "09:00:00",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "password": "correct-horse-battery-staple-42",
}
_NO_EXAMPLE = object()


def _declared(schema: Mapping[str, Any]) -> Any:
    if schema.get("examples"):
        examples = schema["examples"]
        return examples[0] if isinstance(examples, list) else _NO_EXAMPLE
    for key in ("example", "const", "default"):
        if key in schema and schema[key] is not None:
            return schema[key]
    if schema.get("enum"):
        return schema["enum"][0]
    return _NO_EXAMPLE


def _string(schema: Mapping[str, Any]) -> str:
    text = _FORMATS.get(str(schema.get("format", "")), "string")
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    text = text.ljust(low, "x")
    return text[: int(high)] if high is not None else text


def _number(schema: Mapping[str, Any], kind: str) -> int | float:
    value: float = 1
    if "minimum" in schema:
        value = max(value, schema["minimum"])
    if "exclusiveMinimum" in schema:
        value = max(value, schema["exclusiveMinimum"] + 1)
    if "maximum" in schema:
        value = min(value, schema["maximum"])
    return int(value) if kind == "integer" else value


def example(schema: Any, schemas: Mapping[str, Any], depth: int = 0) -> Any:
    """An instance of `schema` (refs into `schemas`), or `_NO_EXAMPLE` when none is found."""
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return _NO_EXAMPLE
    declared = _declared(schema)
    if declared is not _NO_EXAMPLE:
        return declared
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
        return example(schemas.get(ref.removeprefix(_REF_PREFIX)), schemas, depth + 1)
    for key in ("anyOf", "oneOf"):
        variants = [v for v in schema.get(key, []) if v.get("type") != "null"]
        if variants:
            return example(variants[0], schemas, depth + 1)
    if schema.get("allOf"):
        return example(schema["allOf"][0], schemas, depth + 1)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        required = set(schema.get("required", []))
        out: dict[str, Any] = {}
        for name, sub in schema.get("properties", {}).items():
            if name not in required and _declared(sub) is _NO_EXAMPLE:
                continue
            value = example(sub, schemas, depth + 1)
            if value is not _NO_EXAMPLE:
                out[name] = value
        return out
    if kind == "array":
        item = example(schema.get("items", {}), schemas, depth + 1)
        if item is _NO_EXAMPLE or schema.get("maxItems") == 0:
            return []
        return [item] * max(1, int(schema.get("minItems", 1)))
    if kind == "string":
        return _string(schema)
    if kind in ("integer", "number"):
        return _number(schema, kind)
    if kind == "boolean":
        return True
    return _NO_EXAMPLE


def add_examples(document: dict[str, Any]) -> None:
    """Give every JSON request and response body of `document` without an example one."""
    schemas = document.get("components", {}).get("schemas", {})
    for item in document.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            bodies = [operation.get("requestBody", {})]
            bodies += list(operation.get("responses", {}).values())
            for body in bodies:
                media = body.get("content", {}).get("application/json")
                if media is None or "example" in media or "examples" in media:
                    continue
                value = example(media.get("schema"), schemas)
                if value is not _NO_EXAMPLE:
                    media["example"] = value
