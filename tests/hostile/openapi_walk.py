"""Reading the merged OpenAPI document: every operation, its parameters and its body's fields.

The hostile tests enumerate what to attack from the document the gateway serves, so an endpoint
added later is attacked too without anyone remembering to list it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

Schema = dict[str, Any]
METHODS = ("get", "put", "post", "patch", "delete")


@dataclass(frozen=True)
class Field:
    """A leaf of a request: `location` is path, query or body; `path` the keys down to it."""

    location: str
    path: tuple[str, ...]
    schema: Schema
    required: bool

    @property
    def name(self) -> str:
        return next(p for p in reversed(self.path) if p != "[]")

    @property
    def label(self) -> str:
        return ".".join(p for p in self.path if p != "[]")

    @property
    def format(self) -> str | None:
        return self.schema.get("format")

    @property
    def is_text(self) -> bool:
        """Free text: a string with neither a format nor a fixed set of values."""
        return (
            self.schema.get("type") == "string"
            and "enum" not in self.schema
            and "const" not in self.schema
            and self.format not in ("uuid", "date-time", "date", "binary", "email", "uri")
        )

    @property
    def is_id(self) -> bool:
        return self.schema.get("type") == "string" and self.format == "uuid"


@dataclass
class Operation:
    method: str
    path: str
    public: bool
    params: list[Field] = field(default_factory=list)
    body_type: str | None = None
    body_schema: Schema | None = None

    @property
    def key(self) -> str:
        return f"{self.method.upper()} {self.path}"


class Document:
    """The merged OpenAPI document, with `$ref`s resolved on demand."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def resolve(self, schema: Schema) -> Schema:
        while "$ref" in schema:
            node: Any = self.document
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def plain(self, schema: Schema) -> Schema:
        """`schema` without its `$ref` and without the `null` branch of an optional value."""
        schema = self.resolve(schema)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = [self.resolve(s) for s in schema[key]]
                real = [s for s in branches if s.get("type") != "null"]
                if len(real) == 1:
                    return {**real[0], **{k: v for k, v in schema.items() if k != key}}
        return schema

    def operations(self) -> Iterator[Operation]:
        for path, item in self.document["paths"].items():
            for method, spec in item.items():
                if method not in METHODS:
                    continue
                operation = Operation(method, path, public=spec.get("security") == [])
                for param in spec.get("parameters", []):
                    operation.params.append(
                        Field(
                            param["in"],
                            (param["name"],),
                            self.plain(param.get("schema", {})),
                            bool(param.get("required")),
                        )
                    )
                content = spec.get("requestBody", {}).get("content", {})
                for media_type, body in content.items():
                    operation.body_type = media_type
                    operation.body_schema = self.plain(body.get("schema", {}))
                    break
                yield operation

    def body_fields(self, schema: Schema, path: tuple[str, ...] = ()) -> Iterator[Field]:
        """The leaves of a body: scalars, and the items of arrays (as `name.[]`)."""
        yield from self._leaves(schema, path, required=True, depth=0)

    def _leaves(
        self, schema: Schema, path: tuple[str, ...], *, required: bool, depth: int
    ) -> Iterator[Field]:
        schema = self.plain(schema)
        if depth > 5:
            return
        if "anyOf" in schema or "oneOf" in schema:
            # A body that is one object or a list of them (bulk create): the object's fields.
            branches: list[Schema] = schema.get("anyOf") or schema.get("oneOf") or []
            for branch in map(self.plain, branches):
                if branch.get("type") == "object" or "properties" in branch:
                    yield from self._leaves(branch, path, required=required, depth=depth + 1)
                    return
            return
        if schema.get("type") == "object" or "properties" in schema:
            needed = set(schema.get("required", []))
            for name, sub in schema.get("properties", {}).items():
                yield from self._leaves(
                    sub, (*path, name), required=name in needed, depth=depth + 1
                )
        elif schema.get("type") == "array":
            yield from self._leaves(
                schema.get("items", {}), (*path, "[]"), required=required, depth=depth + 1
            )
        elif path:
            yield Field("body", path, schema, required)


def set_at(body: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Put `value` at `path` in `body` (an array step `[]` makes a one-item list)."""
    node: Any = body
    for position, part in enumerate(path):
        last = position == len(path) - 1
        following = None if last else path[position + 1]
        if following == "[]":
            if last or position + 2 == len(path):
                node[part] = [value]
                return
            node = node.setdefault(part, [{}])[0]
            continue
        if part == "[]":
            continue
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def found_values(answer: Any, name: str) -> Iterator[Any]:
    """Every value under the key `name` anywhere in a JSON answer."""
    if isinstance(answer, dict):
        for key, value in answer.items():
            if key == name:
                yield value
            yield from found_values(value, name)
    elif isinstance(answer, list):
        for item in answer:
            yield from found_values(item, name)


def fresh_address() -> str:
    return f"hostile-{uuid.uuid4().hex[:12]}@example.com"


def sample(item: Field, values: Mapping[str, Any]) -> Any:
    """A valid value for `item`: from `values` by name, else one that fits its schema."""
    if item.name in values:
        return values[item.name]
    schema = item.schema
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "integer" or kind == "number":
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    if item.format == "email":
        return fresh_address()
    if item.format == "uuid":
        return str(uuid.uuid4())
    return "x" * max(1, schema.get("minLength", 1))


def body_for(
    document: Document,
    operation: Operation,
    values: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`base`, plus a valid value for each required field of the body it leaves out."""
    body: dict[str, Any] = dict(base or {})
    if operation.body_schema is None:
        return body
    for item in document.body_fields(operation.body_schema):
        if item.required and item.path[0] not in body:
            set_at(body, item.path, sample(item, values))
    return body
