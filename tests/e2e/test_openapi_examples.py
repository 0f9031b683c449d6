"""/docs shows an example for every request body and every success response, and the
examples are valid for their models."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from loyalty.api.app import BATCH_EXAMPLE
from loyalty.api.schemas import OPENAPI_EXAMPLES, Batch


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return resolved


def _has_example(doc: dict[str, Any], content: dict[str, Any]) -> bool:
    for media in content.values():
        if "example" in media or "examples" in media:
            return True
        if "examples" in _resolve(doc, media.get("schema", {})):
            return True
    return False


def test_every_route_has_examples(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    missing = []
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            body = op.get("requestBody")
            if body is not None and not _has_example(doc, body["content"]):
                missing.append(f"{method.upper()} {path} request")
            ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
            if not _has_example(doc, ok.get("content", {})):
                missing.append(f"{method.upper()} {path} response")
    assert not missing, missing


def test_examples_are_valid() -> None:
    for model, example in OPENAPI_EXAMPLES.items():
        model.model_validate(example)
    assert len(Batch.model_validate(BATCH_EXAMPLE).events) == 2


def test_docs_page_is_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
