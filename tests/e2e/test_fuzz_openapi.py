"""Fuzz the HTTP contract with schemathesis, from the app's own OpenAPI document.

Every operation gets schema-valid and schema-violating requests (bodies, paths, queries,
headers), each sent with an operator, a shop and an ingest key. Checks: no 5xx, status
codes, content types and bodies as documented (every error is problem+json with a
``code``), invalid input rejected, security headers on every response.

Not checked: ``positive_data_acceptance`` (a schema-valid request may still be refused
with 4xx). The service is stricter than JSON Schema can say: NUL anywhere in nested
attributes, byte sizes of attributes, integers that are written as ``5.0`` (strict
amounts), opaque history cursors, cross-field rule checks (duplicate event types).

Bounded (``LOYALTY_FUZZ_EXAMPLES`` per operation, 25 by default; derandomized, so a run
is reproducible) on SQLite, so that it runs in ``make test``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.config import Settings

EXAMPLES = int(os.environ.get("LOYALTY_FUZZ_EXAMPLES", "25"))
EDGE_DAYS = ["9999-12-31", "0001-01-01", "9000-12-31", "1970-01-01"]
"""Days at the edges of the calendar and of ``loyalty.domain.limits`` (#27: a report
ending on 9999-12-31 was a 500): generated for every ``format: date`` half the time."""
schemathesis.openapi.format(
    "date",
    st.one_of(st.sampled_from(EDGE_DAYS[:2]), st.sampled_from(EDGE_DAYS), st.dates().map(str)),
)
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@pytest.fixture(scope="module")
def fuzz_app(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("fuzz") / "loyalty.db"
    shutil.copy(sqlite_template, path)
    app_settings = Settings(database_url=f"sqlite:///{path}")
    db = Database(app_settings)
    store = KeyStore(db)
    keys = {
        role: store.create(Role(role), f"fuzz-{role}") for role in ("operator", "shop", "ingest")
    }
    app = create_app(app_settings, db=db)
    with TestClient(app) as client:  # runs the lifespan; seeds one member
        adjust = {"adjustment_id": "a-1", "currency": 50, "rank_points": 5, "reason": "seed"}
        headers = {"Authorization": f"Bearer {keys['operator']}"}
        assert client.post("/v1/members/alice/adjustments", json=adjust, headers=headers).is_success
        yield app, keys
    db.dispose()


def header(response: Any, name: str) -> str:
    """One header of a schemathesis response (its headers map names to lists)."""
    values = response.headers.get(name) or [""]
    return str(values[0])


def check_security_headers(response: Any, path: str) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert header(response, name) == value, (path, name, response.headers)
    if not path.startswith("/docs"):
        assert "default-src 'none'" in header(response, "content-security-policy")


def test_openapi_declares_problem_json_on_every_route(fuzz_app: Any) -> None:
    app: FastAPI = fuzz_app[0]
    document = app.openapi()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert any(s.startswith("2") for s in responses), (method, path)
            ok = next(r for s, r in responses.items() if s.startswith("2"))
            if path != "/metrics":
                assert "application/json" in ok["content"], (method, path)
            for status, response in responses.items():
                if status[0] in "45":
                    assert response["content"] == {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    }, (method, path, status)
            if operation.get("security"):
                assert {"401", "403", "503"} <= responses.keys(), (method, path)
            if "requestBody" in operation:
                assert {"413", "415", "422"} <= responses.keys(), (method, path)


@pytest.mark.slow  # in-process but long: left out of make test-fast
def test_fuzz_every_operation_with_every_role(fuzz_app: Any) -> None:
    app, keys = fuzz_app
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = app
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            nonlocal calls
            negative = case.meta is not None and case.meta.generation.mode.is_negative
            for key in keys.values():
                headers = {"Authorization": f"Bearer {key}"}
                if negative and "Authorization" not in (case.headers or {}):
                    headers = {}  # a case without credentials keeps them out
                calls += 1
                response = case.call_and_validate(
                    headers=headers, excluded_checks=[positive_data_acceptance]
                )
                assert response.status_code < 500, response.text
                check_security_headers(response, case.formatted_path)
                if response.status_code >= 400:
                    assert header(response, "content-type") == "application/problem+json"
                    assert response.json()["code"]

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report all
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert calls > 200
