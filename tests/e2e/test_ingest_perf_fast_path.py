"""The ingress fast path (pydantic-core only, no per-event Python validator) accepts
exactly what ``Batch`` accepts, with the same values, and leaves every error to
``Batch`` so that 400/422 answers are unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loyalty.api.problems import ApiProblem, validation_errors
from loyalty.api.routes.ingress import _validate
from loyalty.application.commands.ingress import Batch


def reference(body: bytes) -> Any:
    """What the original, Batch-only parser answered."""
    from pydantic import ValidationError

    try:
        batch = Batch.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            return ("problem", 400, "malformed_json", None)
        return ("problem", 422, "validation_error", validation_errors(errors))
    return (
        "ok",
        batch.batch_id,
        [(e.event_id, e.user_id, e.type, e.occurred_at, e.attributes) for e in batch.events],
    )


def fast(body: bytes) -> Any:
    try:
        batch_id, events = _validate(body)
    except ApiProblem as problem:
        return ("problem", problem.status, problem.code, problem.errors)
    return ("ok", batch_id, events)


def event(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": "e-1",
        "user_id": "u-1",
        "type": "played_game",
        "occurred_at": "2026-11-26T10:00:00Z",
        "attributes": {"result": "win"},
    }
    body.update(over)
    return body


TIMESTAMPS = [
    "2026-11-26T10:00:00Z",
    "2026-11-26T10:00:00.1Z",
    "2026-11-26T10:00:00.123456Z",
    "2026-11-26T10:00:00.1234567Z",
    "2026-11-26T10:00:00.123456789Z",
    "2026-11-26T10:00:00.1234567891Z",
    "2026-11-26t10:00:00z",
    "2026-11-26T10:00:00z",
    "2026-11-26t10:00:00.999999999+05:30",
    "2026-11-26T10:00:00+00:00",
    "2026-11-26T10:00:00-00:00",
    "2026-11-26T10:00:00.5-08:00",
    "2026-11-26T10:00:00.123456+14:00",
    "2026-11-26T10:00:00.1234567+14:00",
    "2026-11-26T10:00:00+24:00",
    "2026-11-26T10:00:00+23:59",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2026-13-01T10:00:00Z",
    "2026-02-30T10:00:00Z",
    "2026-11-26T23:59:60Z",
    "2026-11-26T24:00:00Z",
    "2026-11-26 10:00:00Z",
    "2026-11-26T10:00:00",
    "2026-11-26T10:00Z",
    "2026-11-26T10:00:00.Z",
    "2026-11-26T10:00:00Z\n",
    "\u0662\u0660\u0662\u0666-11-26T10:00:00Z",
    "",
    17,
    None,
    1.5,
]


@pytest.mark.parametrize("stamp", TIMESTAMPS, ids=repr)
def test_timestamps_parse_exactly_as_batch_does(stamp: Any) -> None:
    body = json.dumps({"events": [event(), event(event_id="e-2", occurred_at=stamp)]}).encode()
    got, want = fast(body), reference(body)
    assert got == want
    if got[0] == "ok":  # same instant and the same zone object (UTC), not just equal
        assert [e[3].tzinfo for e in got[2]] == [e[3].tzinfo for e in want[2]]
        assert [e[3].isoformat() for e in got[2]] == [e[3].isoformat() for e in want[2]]


BODIES: list[Any] = [
    {"events": []},
    {"batch_id": None, "events": [event()]},
    {"batch_id": "", "events": [event()]},
    {"batch_id": "b" * 129, "events": [event()]},
    {"batch_id": 5, "events": [event()]},
    {"events": [event(attributes=None)]},
    {"events": [event(attributes=[])]},
    {"events": [{k: v for k, v in event().items() if k != "attributes"}]},
    {"events": [{k: v for k, v in event().items() if k != "user_id"}]},
    {"events": [event(extra=1)]},
    {"events": [event(user_id="a\tb")]},
    {"events": [event(user_id="back\\slash \u00e9\u6f22\U0001f600")]},
    {"events": [event(event_id="x" * 128)]},
    {"events": [event(event_id="x" * 129)]},
    {"events": [event(type="Played")]},
    {"events": [event(type=None)]},
    {"events": [event(attributes={"nested": {"a": [1, 2.5, None, True]}})]},
    {"events": [event(), event(event_id=3, occurred_at="bad")]},
    {"events": "nope"},
    {"events": None},
    {},
    [],
    {"events": [event()], "more": 1},
]


@pytest.mark.parametrize("doc", BODIES, ids=lambda d: json.dumps(d)[:60])
def test_bodies_validate_exactly_as_batch_does(doc: Any) -> None:
    body = json.dumps(doc).encode()
    assert fast(body) == reference(body)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b'{"events": [}', b"null", b"[]"])
def test_malformed_bodies_answer_as_batch_does(raw: bytes) -> None:
    assert fast(raw) == reference(raw)
