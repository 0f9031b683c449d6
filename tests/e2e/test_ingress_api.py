"""POST /v1/ingress/batches over HTTP against create_app, on both backends."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database

URL = "/v1/ingress/batches"
Headers = dict[str, str]


def rows(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM ingress_events")).scalar_one())


def event(clock, i: int, **over: object) -> dict[str, object]:  # type: ignore[no-untyped-def]
    body: dict[str, object] = {
        "event_id": f"e{i}",
        "user_id": f"user-{i % 5}",
        "type": "played_game",
        "occurred_at": clock.now.isoformat(),
        "attributes": {"result": "win" if i % 2 else "loss"},
    }
    body.update(over)
    return body


def test_same_batch_twice_is_all_duplicates(client: TestClient, make_key, clock, db) -> None:  # type: ignore[no-untyped-def]
    key = make_key("ingest")
    batch = {"batch_id": "b-1", "events": [event(clock, i) for i in range(50)]}
    first = client.post(URL, json=batch, headers=key)
    assert first.status_code == 202
    assert first.json() == {
        "batch_id": "b-1",
        "accepted": 50,
        "duplicates": 0,
        "rejected": [],
        "conflicts": 0,
        "duplicate_events": [],
        "unweighed_types": {},
    }
    second = client.post(URL, json=batch, headers=key)
    assert second.json() == {
        "batch_id": "b-1",
        "accepted": 0,
        "duplicates": 50,
        "rejected": [],
        "conflicts": 0,
        "duplicate_events": [
            {"index": i, "event_id": f"e{i}", "kind": "repeat"} for i in range(50)
        ],
        "unweighed_types": {},
    }
    assert rows(db) == 50


def test_batch_id_is_generated_when_absent(client: TestClient, make_key, clock) -> None:  # type: ignore[no-untyped-def]
    body = client.post(URL, json={"events": [event(clock, 1)]}, headers=make_key()).json()
    assert len(body["batch_id"]) == 32 and body["accepted"] == 1


@pytest.mark.parametrize(
    ("bad", "loc"),
    [
        ({"occurred_at": "2026-11-26T10:00:00"}, "events[3].occurred_at"),
        ({"occurred_at": 1764151200}, "events[3].occurred_at"),
        ({"user_id": ""}, "events[3].user_id"),
        ({"user_id": "x" * 129}, "events[3].user_id"),
        ({"user_id": "tab\tin id"}, "events[3].user_id"),
        ({"event_id": 17}, "events[3].event_id"),
        ({"type": "Played Game"}, "events[3].type"),
        ({"type": "x" * 65}, "events[3].type"),
        ({"attributes": [1, 2]}, "events[3].attributes"),
        ({"attributes": {"blob": "x" * 5000}}, "events[3].attributes"),
        ({"attributes": {"nul": "a\u0000b"}}, "events[3].attributes"),
        ({"attributes": {"huge": 2**70}}, "events[3].attributes"),
        ({"surprise": True}, "events[3].surprise"),
    ],
)
def test_schema_error_names_the_field_and_stores_nothing(  # type: ignore[no-untyped-def]
    client: TestClient, make_key, clock, db, bad: dict[str, object], loc: str
) -> None:
    events = [event(clock, i) for i in range(6)]
    events[3].update(bad)
    resp = client.post(URL, json={"events": events}, headers=make_key())
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert body["code"] == "validation_error" and body["status"] == 422
    assert [e["loc"] for e in body["errors"]] == [loc]
    assert rows(db) == 0


def test_missing_events_and_missing_fields_are_named(client: TestClient, make_key, clock) -> None:  # type: ignore[no-untyped-def]
    assert client.post(URL, json={}, headers=make_key()).json()["errors"] == [
        {"loc": "events", "msg": "Field required"}
    ]
    ev = event(clock, 0)
    del ev["user_id"]
    locs = [
        e["loc"]
        for e in client.post(URL, json={"events": [ev]}, headers=make_key()).json()["errors"]
    ]
    assert locs == ["events[0].user_id"]


def test_malformed_json_is_400_not_500(client: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    for body in (b"{", b"", b"\xff\xfe", b'{"events": [}'):
        resp = client.post(
            URL, content=body, headers={**make_key(), "content-type": "application/json"}
        )
        assert resp.status_code == 400, body
        assert resp.json()["code"] == "malformed_json"


def test_wrong_content_type_is_415(client: TestClient, make_key, clock, db) -> None:  # type: ignore[no-untyped-def]
    resp = client.post(
        URL,
        content=json.dumps({"events": [event(clock, 1)]}),
        headers={**make_key(), "content-type": "text/plain"},
    )
    assert resp.status_code == 415
    resp = client.post(
        URL,
        content=b"\x1f\x8b",
        headers={**make_key(), "content-type": "application/json", "content-encoding": "gzip"},
    )
    assert resp.status_code == 415
    assert rows(db) == 0


def test_413_before_parsing(client: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    limit = client.app.state.container.settings.max_batch_bytes  # type: ignore[attr-defined]
    junk = b"{" * (limit + 1)  # would be a 400 if it were parsed
    resp = client.post(
        URL, content=junk, headers={**make_key(), "content-type": "application/json"}
    )
    assert resp.status_code == 413
    assert resp.json()["code"] == "batch_too_large"

    def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: counted as it streams
        for _ in range(limit // 65536 + 2):
            yield b"{" * 65536

    resp = client.post(
        URL, content=chunks(), headers={**make_key(), "content-type": "application/json"}
    )
    assert resp.status_code == 413


def test_413_over_10000_events(client: TestClient, make_key, clock, db) -> None:  # type: ignore[no-untyped-def]
    ev = event(clock, 0, attributes={})
    events = [{**ev, "event_id": str(i)} for i in range(10_001)]
    resp = client.post(URL, json={"events": events}, headers=make_key())
    assert resp.status_code == 413
    assert resp.json()["code"] == "too_many_events"
    assert rows(db) == 0
    ok = client.post(URL, json={"events": events[:10_000]}, headers=make_key())
    assert ok.json()["accepted"] == 10_000


def test_too_old_and_future_are_rejected_per_event(client: TestClient, make_key, clock, db) -> None:  # type: ignore[no-untyped-def]
    now = clock.now
    events = [
        event(clock, 0),
        event(clock, 1, occurred_at=(now - timedelta(days=7, seconds=1)).isoformat()),
        event(clock, 2, occurred_at=(now + timedelta(minutes=6)).isoformat()),
        event(clock, 3, occurred_at=(now - timedelta(days=6, hours=23)).isoformat()),
    ]
    body = client.post(URL, json={"events": events}, headers=make_key()).json()
    assert body["accepted"] == 2
    assert body["rejected"] == [
        {"index": 1, "event_id": "e1", "reason": "too_old"},
        {"index": 2, "event_id": "e2", "reason": "in_future"},
    ]
    assert rows(db) == 2


def test_auth_and_roles(client: TestClient, make_key, clock, db) -> None:  # type: ignore[no-untyped-def]
    batch = {"events": [event(clock, 1)]}
    none = client.post(URL, json=batch)
    assert none.status_code == 401 and none.json()["code"] == "missing_api_key"
    assert none.headers["www-authenticate"] == "Bearer"
    bad = client.post(URL, json=batch, headers={"Authorization": "Bearer lk_nope"})
    assert bad.status_code == 401 and bad.json()["code"] == "invalid_api_key"
    forged = make_key()["Authorization"][:-4] + "AAAA"
    assert client.post(URL, json=batch, headers={"Authorization": forged}).status_code == 401
    shop = client.post(URL, json=batch, headers=make_key("shop"))
    assert shop.status_code == 403 and shop.json()["code"] == "forbidden"
    assert rows(db) == 0
    assert client.post(URL, json=batch, headers=make_key("operator")).status_code == 202


def test_revoked_key_is_refused(client: TestClient, db, clock) -> None:  # type: ignore[no-untyped-def]
    from loyalty.adapters.keys import KeyStore
    from loyalty.application.access import Role

    store = client.app.state.container.keys  # type: ignore[attr-defined]
    key = KeyStore(db).create(Role.INGEST, "src")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post(URL, json={"events": []}, headers=headers).status_code == 202
    assert store.revoke(key.split("_")[1])
    assert client.post(URL, json={"events": []}, headers=headers).status_code == 401


def test_unknown_route_and_method_are_problems(client: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/nope")
    assert resp.status_code == 404 and resp.json()["code"] == "not_found"
    resp = client.get(URL, headers=make_key())
    assert resp.status_code == 405 and resp.json()["code"] == "method_not_allowed"


def test_health(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readyz_is_503_when_the_database_is_down() -> None:
    from loyalty.api.app import create_app
    from loyalty.config import Settings

    settings = Settings(database_url="postgresql://postgres@127.0.0.1:1/none")
    with TestClient(create_app(settings)) as down:
        assert down.get("/healthz").status_code == 200
        resp = down.get("/readyz")
        assert resp.status_code == 503
        assert resp.json()["code"] == "database_unavailable"


def test_duplicates_are_listed_and_conflicts_told_from_repeats(  # type: ignore[no-untyped-def]
    client: TestClient, make_key, clock, db
) -> None:
    """Issue 32 item 1: a reused event_id with other content is a conflict, in one batch
    and against a stored event (on both backends), and is counted in the metrics."""
    key = make_key("ingest")
    e1 = event(clock, 1)
    same_reordered = {**e1, "attributes": dict(reversed(list(e1["attributes"].items())))}  # type: ignore[attr-defined]
    other = event(clock, 1, user_id="someone-else", type="made_purchase")
    first = client.post(URL, json={"events": [e1, event(clock, 2), other]}, headers=key).json()
    assert first["accepted"] == 2 and first["duplicates"] == 1 and first["conflicts"] == 1
    assert first["duplicate_events"] == [{"index": 2, "event_id": "e1", "kind": "conflict"}]
    resend = [event(clock, 3), same_reordered, other, event(clock, 2, attributes={"x": 1})]
    second = client.post(URL, json={"events": resend}, headers=key).json()
    assert second["accepted"] == 1 and second["duplicates"] == 3 and second["conflicts"] == 2
    assert second["duplicate_events"] == [
        {"index": 1, "event_id": "e1", "kind": "repeat"},
        {"index": 2, "event_id": "e1", "kind": "conflict"},
        {"index": 3, "event_id": "e2", "kind": "conflict"},
    ]
    assert rows(db) == 3
    registry = client.app.state.container.metrics.registry  # type: ignore[attr-defined]
    samples = {
        s.labels.get("source"): s.value
        for m in registry.collect()
        if m.name == "loyalty_ingest_conflicts"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert list(samples.values()) == [3.0]


def test_unweighed_types_are_accepted_and_said(client: TestClient, make_key, clock, db) -> None:  # type: ignore[no-untyped-def]
    """Issue 32 item 2: events of a type no current rule weighs are stored and reported
    per batch (type and count) and in a metric per source and type."""
    key = make_key("ingest")
    events = [
        event(clock, 1),
        event(clock, 2, type="levelled_up"),
        event(clock, 3, type="levelled_up"),
        event(clock, 4, type="zz_unknown"),
    ]
    body = client.post(URL, json={"events": events}, headers=key).json()
    assert body["accepted"] == 4
    assert body["unweighed_types"] == {"levelled_up": 2, "zz_unknown": 1}
    again = client.post(URL, json={"events": events}, headers=key).json()
    assert again["unweighed_types"] == {}  # duplicates are not counted again
    registry = client.app.state.container.metrics.registry  # type: ignore[attr-defined]
    samples = {
        s.labels["type"]: s.value
        for m in registry.collect()
        if m.name == "loyalty_ingest_unweighed_events"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert samples == {"levelled_up": 2.0, "zz_unknown": 1.0}


def test_messages_say_in_words_what_is_wrong_and_where(client: TestClient, make_key, clock) -> None:  # type: ignore[no-untyped-def]
    """Issue 32 item 3: no raw regular expression in a message; malformed JSON names the
    line and column; duplicate_key names the repeated key; "an ingest key"."""
    key = make_key("ingest")
    json_key = {**key, "Content-Type": "application/json"}
    events = [event(clock, 0, user_id="a/b"), event(clock, 1, type="Played Game")]
    body = client.post(URL, json={"events": events}, headers=key).json()
    msgs = {e["loc"]: e["msg"] for e in body["errors"]}
    assert msgs["events[0].user_id"] == "must not contain control characters or '/'"
    assert msgs["events[1].type"].startswith("must be 1 to 64 characters")
    assert not any("pattern" in m or "^" in m for m in msgs.values())
    bad = client.post(URL, content=b'{"events": [\n  {"event_id": }]}', headers=json_key)
    assert bad.status_code == 400
    assert "line 2 column" in bad.json()["detail"], bad.json()
    dup = (
        b'{"events": [{"event_id": "e1", "user_id": "u", "type": "t", "occurred_at": "%s", '
        b'"attributes": {"lvl": 1, "lvl": 2}}]}'
    )
    resp = client.post(URL, content=dup % clock.now.isoformat().encode(), headers=json_key)
    assert resp.status_code == 422 and resp.json()["code"] == "duplicate_key"
    assert resp.json()["errors"][0]["loc"] == "events[0].attributes.lvl"
    shop = make_key("shop", "webshop")
    refused = client.post(URL, json={"events": []}, headers=shop)
    assert refused.status_code == 403
    assert refused.json()["detail"] == "this endpoint needs an ingest key"


def test_batch_id_is_defined_as_a_label_not_an_idempotency_key(  # type: ignore[no-untyped-def]
    client: TestClient, make_key, clock
) -> None:
    """Issue 32 item 4: the schema says what batch_id is for; reusing one stores new
    events (idempotency is per event)."""
    spec = client.get("/openapi.json").json()
    description = spec["components"]["schemas"]["Batch"]["properties"]["batch_id"]["description"]
    assert "not a key of idempotency" in description
    key = make_key("ingest")
    client.post(URL, json={"batch_id": "b", "events": [event(clock, 1)]}, headers=key)
    again = client.post(URL, json={"batch_id": "b", "events": [event(clock, 2)]}, headers=key)
    assert again.json()["accepted"] == 1
