"""Forget-me: a canary goes through every path, is forgotten, and leaves no trace."""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.erasure_store import EXEMPT, LOCATIONS, REGISTRY, SqlErasureStore
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.tables import caps_partition_day
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.application.erasure import ERASING_STEPS
from loyalty.bootstrap import build_forget_service, build_pipeline, build_projection
from loyalty.config import Settings
from loyalty.domain.errors import MemberBeingErased
from tests.conftest import drain_pipeline

BATCHES = "/v1/ingress/batches"


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """The same database, with forget-me not waiting for other processes (there are
    none in these tests) and markers re-read at once."""
    return settings.model_copy(
        update={"forget_settle_seconds": 0.0, "marker_refresh_seconds": 0.01}
    )


@pytest.fixture
def app_client(fast: Settings, db: Database, clock) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(fast, db=db, clock=clock)) as c:
        yield c


def keys(db: Database) -> dict[str, dict[str, str]]:
    store = KeyStore(db)
    return {
        role: {"Authorization": f"Bearer {store.create(Role(role), 'src-' + role)}"}
        for role in ("ingest", "shop", "operator")
    }


def process_everything(client: TestClient) -> None:
    container = client.app.state.container  # type: ignore[attr-defined]
    drain_pipeline(container.db)
    build_projection(container.db).catch_up()


def table_names(db: Database) -> list[str]:
    with db.read() as conn:
        names = sa.inspect(conn).get_table_names()
    # day partitions (of the ingress and of the caps) and the keys' generations: read and
    # erased through their parents
    partitions = ("ingress_events_p", "ingress_keys_g")
    return [
        n
        for n in names
        if not n.startswith(partitions) and caps_partition_day(n) is None and n != "sqlite_sequence"
    ]


def rows_containing(db: Database, marker: str) -> dict[str, int]:
    found = {}
    with db.read() as conn:
        for table in table_names(db):
            rows = conn.execute(sa.text(f'SELECT * FROM "{table}"')).all()
            hits = sum(
                1
                for r in rows
                if marker in repr(tuple(r))
                or any(isinstance(v, bytes | memoryview) and marker.encode() in bytes(v) for v in r)
            )
            if hits:
                found[table] = hits
    return found


def raw_bytes_contain(settings: Settings, marker: str) -> bool:
    if settings.backend == "sqlite":
        path = settings.sqlite_path
        files = [path, path.with_name(path.name + "-wal")]
        return any(f.exists() and marker.encode() in f.read_bytes() for f in files)
    dump = subprocess.run(
        ["pg_dump", "--data-only", settings.database_url], capture_output=True, check=True
    )
    return marker.encode() in dump.stdout


def test_every_table_is_registered_for_erasure_or_exempt(db: Database) -> None:
    registered = {t for tables in LOCATIONS.values() for t in tables}
    unknown = set(table_names(db)) - registered - set(EXEMPT)
    assert not unknown, f"tables with no erasure owner: {sorted(unknown)}"
    assert not registered & set(EXEMPT), "a table both erased and exempt"
    # each registered table is erased: by a store's erasure run in an erasing step, or
    # (said explicitly) in another location's transaction or a step of the request
    keys = {r.key for r in REGISTRY}
    for r in REGISTRY:
        if r.erase is None:
            assert r.step is None and r.erased_by, r.key
            assert r.erased_by in keys or r.erased_by.startswith("the subject step"), r.key
        else:
            assert r.step in ERASING_STEPS and not r.erased_by, r.key
    walked = [(loc.key, loc.step) for loc in SqlErasureStore(db).locations()]
    assert walked == [(r.key, r.step) for r in REGISTRY if r.erase is not None]
    assert {step for _, step in walked} == set(ERASING_STEPS)  # no step left empty


def test_canary_leaves_no_trace(
    fast: Settings, db: Database, app_client: TestClient, clock
) -> None:  # type: ignore[no-untyped-def]
    marker = f"canary-{uuid.uuid4().hex}"
    k = keys(db)
    now = clock.now
    events = [
        {
            "event_id": f"e{i}",
            "user_id": user,
            "type": kind,
            "occurred_at": (now - timedelta(hours=i)).isoformat(),
            "attributes": {"note": marker if user == marker else "x"},
        }
        for i, (user, kind) in enumerate(
            [
                (marker, "joined_competition"),
                (marker, "played_game"),
                (marker, "logged_on"),
                ("bystander", "joined_competition"),
            ]
        )
    ]
    assert (
        app_client.post(BATCHES, json={"events": events}, headers=k["ingest"]).json()["accepted"]
        == 4
    )
    process_everything(app_client)
    member = f"/v1/members/{marker}"
    assert app_client.get(member, headers=k["shop"]).json()["currency"] == 26
    assert (
        app_client.post(
            member + "/spend", json={"order_id": f"o-{marker}", "amount": 5}, headers=k["shop"]
        ).status_code
        == 200
    )
    assert (
        app_client.post(
            member + "/refunds", json={"order_id": f"o-{marker}"}, headers=k["shop"]
        ).status_code
        == 200
    )
    adj = {
        "adjustment_id": f"a-{marker}",
        "currency": 3,
        "rank_points": 4,
        "reason": f"goodwill for {marker}",
    }
    assert (
        app_client.post(member + "/adjustments", json=adj, headers=k["operator"]).status_code == 200
    )
    process_everything(app_client)
    assert len(app_client.get(member + "/history", headers=k["shop"]).json()["entries"]) >= 4
    board = app_client.get("/v1/leaderboard", headers=k["shop"]).json()["entries"]
    assert marker in [e["user_id"] for e in board]
    assert rows_containing(db, marker)  # the canary is everywhere before

    accepted = app_client.post(
        "/v1/forget-requests", json={"user_id": marker}, headers=k["operator"]
    )
    assert accepted.status_code == 202
    request_id = accepted.json()["request_id"]
    service = app_client.app.state.container.forget  # type: ignore[attr-defined]
    assert service.run_pending() == 1

    receipt = app_client.get(f"/v1/forget-requests/{request_id}", headers=k["operator"])
    body = receipt.json()
    assert body["status"] == "completed" and body["completed_at"] is not None
    assert marker not in receipt.text
    assert body["erased"]["ingress_events"] == 3
    assert body["erased"]["event_store"] >= 4  # a new member's first award is one Enrolled
    assert body["erased"]["member_balances"] == 1
    assert app_client.get(member, headers=k["shop"]).status_code == 404
    assert app_client.get(member + "/history", headers=k["shop"]).status_code == 404
    assert marker not in app_client.get("/v1/leaderboard", headers=k["shop"]).text
    with db.read() as conn:
        left = conn.execute(sa.text("SELECT * FROM ingress_events")).all()
    assert rows_containing(db, marker) == {}, left
    assert not raw_bytes_contain(fast, marker)
    # the bystander keeps everything
    assert app_client.get("/v1/members/bystander", headers=k["shop"]).json()["currency"] == 20

    # a late event that occurred before the request is dropped; a new one starts afresh
    late = {
        **events[0],
        "event_id": "late",
        "occurred_at": (now - timedelta(minutes=1)).isoformat(),
    }
    clock.now = now + timedelta(seconds=5)
    fresh = {
        **events[0],
        "event_id": "fresh",
        "attributes": {},
        "occurred_at": (now + timedelta(seconds=4)).isoformat(),
    }
    resp = app_client.post(BATCHES, json={"events": [late, fresh]}, headers=k["ingest"]).json()
    assert resp["accepted"] == 1
    assert resp["rejected"] == [{"index": 0, "event_id": "late", "reason": "forgotten"}]
    process_everything(app_client)
    again = app_client.get(member, headers=k["shop"]).json()
    assert (again["currency"], again["rank_points"]) == (20, 50)  # a fresh account
    assert service.run_pending() == 0  # a repeated run is harmless


@pytest.mark.slow  # in-process but long: left out of make test-fast
@pytest.mark.parametrize(
    "crash_after",
    [
        "marker",
        "settle",
        "ingress",
        "caps",
        "event_store",
        "read_models",
        "marker_done",
        "subject",
        "vacuum",
    ],
)
def test_a_crash_after_any_step_is_finished_on_restart(
    fast: Settings, db: Database, app_client: TestClient, clock, crash_after: str
) -> None:  # type: ignore[no-untyped-def]
    marker = f"canary-{uuid.uuid4().hex}"
    k = keys(db)
    app_client.post(
        BATCHES,
        headers=k["ingest"],
        json={
            "events": [
                {
                    "event_id": "e1",
                    "user_id": marker,
                    "type": "joined_competition",
                    "occurred_at": clock.now.isoformat(),
                }
            ]
        },
    )
    process_everything(app_client)

    class Crash(Exception):
        pass

    def hook(step: str) -> None:
        if step == crash_after:
            raise Crash(step)

    crashing = build_forget_service(db, clock=clock)
    crashing._crash_hook = hook  # type: ignore[attr-defined]
    request = crashing.request(marker)
    with pytest.raises(Crash):
        crashing.run_pending()
    assert crashing.status(request.request_id).status == "running"  # type: ignore[union-attr]
    # a new process picks it up
    assert build_forget_service(db, clock=clock).run_pending() == 1
    done = crashing.status(request.request_id)
    assert done is not None and done.status == "completed" and done.user_id is None
    assert rows_containing(db, marker) == {}
    assert done.erased.get("member_balances") == 1
    assert done.erased.get("event_store", 0) >= 1  # the account's Enrolled at least


def test_forget_while_ingress_flows_leaves_no_residue(
    fast: Settings, db: Database, app_client: TestClient, clock
) -> None:  # type: ignore[no-untyped-def]
    marker = f"canary-{uuid.uuid4().hex}"
    k = keys(db)
    stop = threading.Event()
    container = app_client.app.state.container  # type: ignore[attr-defined]
    pipeline = build_pipeline(db)
    sent: list[int] = []

    def flow() -> list[int]:
        """Posts single-event batches until stopped; returns every answer's status."""
        statuses, i = [], 0
        while not stop.is_set() and i < 400:
            event = {
                "event_id": f"f{i}",
                "user_id": marker,
                "type": "played_game",
                "occurred_at": (clock.now - timedelta(minutes=1)).isoformat(),
            }
            r = app_client.post(BATCHES, json={"events": [event]}, headers=k["ingest"])
            statuses.append(r.status_code)
            sent.append(i)
            i += 1
        return statuses

    def work() -> int:
        """Drains until stopped; returns how often the erasure held a window back."""
        held_back = 0
        while not stop.is_set():
            try:
                pipeline.drain(range(16))
            except MemberBeingErased:  # only the erasure-in-progress signal
                held_back += 1
        return held_back

    with ThreadPoolExecutor(2) as pool:
        flowing, working = pool.submit(flow), pool.submit(work)
        while len(sent) < 50 and not flowing.done():
            threading.Event().wait(0.01)
        try:
            container.forget.request(marker)
            container.forget.run_pending()
        finally:
            stop.set()
        statuses, _held_back = flowing.result(), working.result()  # re-raises a thread's error
    assert len(statuses) >= 50 and set(statuses) == {202}, statuses
    pipeline.drain(range(16))
    build_projection(db).catch_up()
    assert rows_containing(db, marker) == {}
    assert app_client.get(f"/v1/members/{marker}", headers=k["shop"]).status_code == 404


def test_unknown_request_is_404_and_shop_cannot_forget(
    app_client: TestClient, db: Database
) -> None:
    k = keys(db)
    missing = app_client.get(f"/v1/forget-requests/{uuid.uuid4().hex}", headers=k["operator"])
    assert missing.status_code == 404
    assert (
        app_client.post("/v1/forget-requests", json={"user_id": "x"}, headers=k["shop"]).status_code
        == 403
    )
    assert (
        app_client.post(
            "/v1/forget-requests", json={"user_id": ""}, headers=k["operator"]
        ).status_code
        == 422
    )


def test_a_late_runner_cannot_move_a_request_back(db: Database) -> None:
    """Two runners on one request (a lease lost under the first): the one that is behind
    must not record an earlier step after a later one, or a resume would start before
    ``subject`` with the user id already gone (and overwrite the later counts)."""
    from datetime import UTC, datetime

    from loyalty.application.erasure import ERASING, Marker

    store, now = SqlErasureStore(db), datetime.now(UTC)
    marker = Marker(store.subject_hash("late-runner"), "m-late", now, ERASING)
    request_id = store.create_request("late-runner", now, marker, now + timedelta(days=1))
    store.record_step(request_id, "event_store", {"event_store": 4})
    store.record_step(request_id, "subject", {"event_store": 4, "member_history": 2})
    store.record_step(request_id, "caps", {"pipeline_caps": 9})  # the late runner
    found = store.get_request(request_id)
    assert found is not None
    assert (found.step, found.erased) == ("subject", {"event_store": 4, "member_history": 2})
    store.record_step(request_id, "vacuum", {"event_store": 4, "member_history": 2})
    found = store.get_request(request_id)
    assert found is not None and found.step == "vacuum"
