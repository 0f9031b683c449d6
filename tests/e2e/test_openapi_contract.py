"""The OpenAPI document says what the code does (issue 32 item 10): it passes an OpenAPI
linter (openapi-spec-validator), every operation has a written summary and description,
the ingress limits are in its description, and every value the code emits in an
enumerated field is in that field's enum (found by making the code emit them: a live
app on both backends, not a list copied from the code)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from loyalty.adapters.db import Database
from loyalty.api.app import create_app
from loyalty.application.projections import MemberProjection
from loyalty.config import Settings
from tests.conftest import Clock
from tests.e2e.test_event_types import every_event

Headers = dict[str, str]


@pytest.fixture
def app_client(settings: Settings, db: Database, clock: Clock) -> Iterator[TestClient]:
    fast = settings.model_copy(
        update={"forget_settle_seconds": 0.0, "marker_refresh_seconds": 0.01}
    )
    db.settings = fast  # type: ignore[misc]
    with TestClient(create_app(fast, db=db, clock=clock)) as c:
        yield c


def document(client: TestClient) -> dict[str, Any]:
    spec: dict[str, Any] = client.get("/openapi.json").json()
    return spec


def test_the_document_passes_an_openapi_linter(app_client: TestClient) -> None:
    validate(document(app_client))  # raises OpenAPIValidationError with the first problem


def test_every_operation_has_a_written_summary_and_description(app_client: TestClient) -> None:
    """No generated summary ("Post Batch": FastAPI titles the function's name when a
    route sets none); every operation has a description (its docstring)."""
    unwritten = []
    for path, item in document(app_client)["paths"].items():
        for method, operation in item.items():
            # FastAPI's operation id: the function's name + the path (\W -> _) + method
            tail = re.sub(r"\W", "_", path) + "_" + method
            name = operation["operationId"].removesuffix(tail)
            generated = name.replace("_", " ").title()
            summary = operation.get("summary")
            if not summary or summary == generated or not operation.get("description"):
                unwritten.append((method, path, summary))
    assert not unwritten, unwritten


def test_the_ingress_limits_are_in_the_description(app_client: TestClient) -> None:
    settings: Settings = app_client.app.state.container.settings  # type: ignore[attr-defined]
    text = document(app_client)["info"]["description"]
    for figure in (
        f"{settings.max_batch_bytes:,} bytes",
        f"{settings.max_batch_events:,} events",
        f"{settings.max_attributes_bytes:,} bytes of `attributes`",
        f"{settings.retention_days} days",
        f"{settings.future_skew_seconds} s in the future",
        f"{settings.ingest_rate_limit_events_per_s:,.0f} events per second",
        f"{settings.max_request_bytes:,} bytes",
    ):
        assert figure in text, (figure, text)


def enum(spec: dict[str, Any], model: str, field: str) -> set[str]:
    prop = spec["components"]["schemas"][model]["properties"][field]
    assert "enum" in prop, f"{model}.{field} has no enum"
    return set(prop["enum"])


def test_every_value_the_code_emits_in_an_enumerated_field_is_in_the_schema(
    app_client: TestClient, clock: Clock, make_key: Callable[..., Headers]
) -> None:
    spec = document(app_client)
    ops, shop, site = make_key("operator", "ops"), make_key("shop", "shop"), make_key("ingest")
    container = app_client.app.state.container  # type: ignore[attr-defined]
    seen: dict[tuple[str, str], set[str]] = {}

    def saw(model: str, field: str, value: str) -> None:
        seen.setdefault((model, field), set()).add(value)

    # RejectedEvent.reason and DuplicateEvent.kind: a batch that earns every one
    def event(event_id: str, user: str, when: Any, **extra: Any) -> dict[str, Any]:
        return {
            "event_id": event_id,
            "user_id": user,
            "type": "made_purchase",
            "occurred_at": when.isoformat(),
            **extra,
        }

    now = clock.now
    first = app_client.post(
        "/v1/ingress/batches", json={"events": [event("e-1", "ann", now)]}, headers=site
    )
    assert first.status_code == 202, first.text
    forget = app_client.post("/v1/forget-requests", json={"user_id": "gone"}, headers=ops)
    assert forget.status_code == 202, forget.text
    saw("ForgetAccepted", "status", forget.json()["status"])
    assert container.forget.run_pending() == 1
    receipt = app_client.get(f"/v1/forget-requests/{forget.json()['request_id']}", headers=ops)
    saw("ForgetReceipt", "status", receipt.json()["status"])
    clock.now = now + timedelta(seconds=5)
    batch = [
        event("e-1", "ann", now),  # a repeat
        event("e-1", "bob", now),  # a conflict
        event("old", "ann", now - timedelta(days=400)),
        event("future", "ann", now + timedelta(days=1)),
        event("late", "gone", now - timedelta(minutes=1)),
    ]
    answer = app_client.post("/v1/ingress/batches", json={"events": batch}, headers=site).json()
    for rejected in answer["rejected"]:
        saw("RejectedEvent", "reason", rejected["reason"])
    for duplicate in answer["duplicate_events"]:
        saw("DuplicateEvent", "kind", duplicate["kind"])

    # HistoryEntryBody.kind: a member with one of each account event, projected
    every_event(app_client, "every")  # type: ignore[arg-type]
    MemberProjection(container.accounts.app, container.read_models).catch_up()
    history = app_client.get("/v1/members/every/history", headers=shop).json()["entries"]
    for line in history:
        saw("HistoryEntryBody", "kind", line["kind"])

    # StorageLocationBody.kind: every table the storage report lists
    for location in app_client.get("/v1/storage", headers=ops).json()["locations"]:
        saw("StorageLocationBody", "kind", location["kind"])

    outside = {
        key: values - enum(spec, *key) for key, values in seen.items() if values - enum(spec, *key)
    }
    assert not outside, outside
    # and the batch, the member and the forget request made every value they can
    assert seen[("RejectedEvent", "reason")] == enum(spec, "RejectedEvent", "reason")
    assert seen[("DuplicateEvent", "kind")] == enum(spec, "DuplicateEvent", "kind")
    assert seen[("HistoryEntryBody", "kind")] == enum(spec, "HistoryEntryBody", "kind")
    # the explanation's kind and status are tied to the code in tests/e2e/test_explain_api.py
    assert enum(spec, "ExplanationBody", "status") == {"recorded", "pending"}
