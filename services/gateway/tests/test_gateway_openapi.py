"""Unit tests of merging the services' OpenAPI documents into the public one."""

from typing import Any

from gateway.openapi import merge


def _operation(op_id: str, ref: str | None = None, body: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": op_id, "responses": {"200": {"description": "ok"}}}
    if ref:
        operation["responses"]["200"]["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
        }
    if body:
        operation["requestBody"] = {
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}
        }
        operation["responses"]["422"] = {
            "description": "Validation Error",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
            },
        }
    return operation


def _document(paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    return {"openapi": "3.1.0", "paths": paths, "components": {"schemas": schemas}}


CONTACTS = _document(
    {
        "/contacts": {"get": _operation("list", "Page"), "post": _operation("create", body="New")},
        "/internal/recipients": {"get": _operation("recipients", "Secret")},
        "/lists/{id}": {"get": _operation("get_list", "List")},
    },
    {
        "Page": {"type": "object", "properties": {"item": {"$ref": "#/components/schemas/Item"}}},
        "Item": {"type": "object", "properties": {"email": {"type": "string"}}},
        "New": {"type": "object"},
        "List": {"type": "object"},
        "Secret": {"type": "object"},
        "HTTPValidationError": {"type": "object"},
    },
)
TRACKING = _document(
    {
        "/reports": {"get": _operation("list", "Page")},
        "/t/o/{token}": {"get": _operation("pixel")},
        "/contacts": {"get": _operation("stolen", "Page")},
    },
    {
        "Page": {"type": "object", "properties": {"item": {"$ref": "#/components/schemas/Item"}}},
        "Item": {"type": "object", "properties": {"opens": {"type": "integer"}}},
    },
)


def _merged() -> dict[str, Any]:
    return merge({"contacts": CONTACTS, "tracking": TRACKING}, version="1.2.3")


def test_only_public_paths_of_their_owner_are_kept():
    merged = _merged()
    assert sorted(merged["paths"]) == ["/contacts", "/lists/{id}", "/reports", "/t/o/{token}"]
    assert merged["paths"]["/contacts"]["get"]["operationId"] == "list"
    assert "Secret" not in merged["components"]["schemas"]
    assert merged["info"]["version"] == "1.2.3"
    assert merged["openapi"] == "3.1.0"


def test_clashing_schemas_are_renamed_and_references_follow():
    merged = _merged()
    schemas = merged["components"]["schemas"]
    assert schemas["Item"]["properties"] == {"email": {"type": "string"}}
    assert schemas["TrackingItem"]["properties"] == {"opens": {"type": "integer"}}
    # Page is the same text in both, but refers to a different Item: renamed as well.
    assert schemas["TrackingPage"]["properties"]["item"] == {
        "$ref": "#/components/schemas/TrackingItem"
    }
    report = merged["paths"]["/reports"]["get"]["responses"]["200"]
    assert report["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TrackingPage"
    }
    assert merged["paths"]["/reports"]["get"]["operationId"] == "tracking_list"


def test_gateway_answers_security_and_the_error_shape_are_added():
    merged = _merged()
    assert merged["components"]["securitySchemes"]["bearerAuth"]["type"] == "http"
    assert merged["security"] == [{"bearerAuth": []}]
    create = merged["paths"]["/contacts"]["post"]
    assert {"401", "413", "415", "422", "429", "503", "504"} <= set(create["responses"])
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert create["responses"]["422"]["content"]["application/json"]["schema"] == error
    assert "HTTPValidationError" not in merged["components"]["schemas"]
    assert {"ErrorResponse", "ErrorBody", "FieldError"} <= set(merged["components"]["schemas"])
    assert "Retry-After" in create["responses"]["429"]["headers"]
    pixel = merged["paths"]["/t/o/{token}"]["get"]
    assert pixel["security"] == []
    assert "401" not in pixel["responses"]
    assert "413" not in merged["paths"]["/contacts"]["get"]["responses"]


def test_merging_does_not_change_the_sources():
    before = repr(CONTACTS)
    _merged()
    assert repr(CONTACTS) == before
