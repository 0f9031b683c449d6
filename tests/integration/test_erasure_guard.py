"""The erasure guard: no command writes into a member stream that is being or has been
erased, whatever a process has cached and after the marker has expired (issue 13).

On both backends, with real databases: the event insert refuses (in its own transaction)
a stream being erased, one without the event before the saved ones, and one whose marker
is newer than the markers the command read; the callers answer as for an erased member
and start a fresh account only for activity after the request."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.erasure_store import SqlErasureStore
from loyalty.adapters.event_store import erase_stream, event_store_env, worker_env
from loyalty.adapters.keys import KeyStore
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.application.accounts import Accounts, Members, StreamErased
from loyalty.application.erasure import ERASING, Marker
from loyalty.application.pending import PENDING
from loyalty.bootstrap import build_forget_service, build_pipeline, build_projection
from loyalty.config import Settings
from loyalty.domain.errors import MemberBeingErased
from loyalty.domain.member import Member
from loyalty.domain.ranks import RankLadder
from tests.conftest import drain_with

BATCHES = "/v1/ingress/batches"


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"forget_settle_seconds": 0.0, "marker_refresh_seconds": 0.01}
    )


@pytest.fixture
def fdb(fast: Settings) -> Iterator[Database]:
    """The database, its processes re-reading the markers at once."""
    database = Database(fast)
    yield database
    database.dispose()


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    app = Members(env=event_store_env(settings))
    yield app
    app.close()


def keys(db: Database) -> dict[str, dict[str, str]]:
    store = KeyStore(db)
    return {
        role: {"Authorization": f"Bearer {store.create(Role(role), 'src-' + role)}"}
        for role in ("ingest", "shop", "operator")
    }


def stream(db: Database, user_id: str) -> list[int]:
    """The versions stored for a member's stream."""
    member_id = Member.create_id(user_id)
    table = "members_events" if db.backend == "postgresql" else "stored_events"
    key: Any = member_id if db.backend == "postgresql" else member_id.hex
    with db.read() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT originator_version FROM {table} WHERE originator_id = :m "
                "ORDER BY originator_version"
            ),
            {"m": key},
        )
        return [int(r[0]) for r in rows]


def orphans(db: Database) -> int:
    """Streams whose lowest version is not the first."""
    table = "members_events" if db.backend == "postgresql" else "stored_events"
    nil = uuid.UUID(int=0)
    key: Any = nil if db.backend == "postgresql" else nil.hex
    with db.read() as conn:
        return int(
            conn.execute(
                sa.text(
                    f"SELECT count(*) FROM (SELECT originator_id FROM {table} "
                    "WHERE originator_id <> :nil GROUP BY originator_id "
                    "HAVING min(originator_version) > 1) x"
                ),
                {"nil": key},
            ).scalar_one()
        )


def earned(user_id: str, award_id: str, currency: int = 10) -> Member:
    member = Member(user_id=user_id)
    member.award(award_id, currency, 5, 1, 1, RankLadder(()))
    return member


# ------------------------------------------------------------------ the insert itself


def erased_stale_copy(db: Database, members: Members, user_id: str) -> Member:
    """A copy of ``user_id``'s account read before its stream was erased, with one more
    award to save."""
    member = earned(user_id, "a1")
    members.save(member)
    stale: Member = members.repository.get(member.id)
    erase_stream(db, str(member.id))
    stale.award("a2", 1, 1, 1, 1, RankLadder(()))
    return stale


def test_the_insert_refuses_a_stale_copy_of_an_erased_stream(
    db: Database, members: Members
) -> None:
    stale = erased_stale_copy(db, members, "alice")
    with pytest.raises(StreamErased) as refused:
        members.save(stale)
    assert refused.value.reason == "gone" and refused.value.member_ids == [str(stale.id)]
    assert stream(db, "alice") == []  # nothing orphaned
    members.save(earned("alice", "a3"))  # a fresh account may start at version 1
    assert stream(db, "alice") == [1]  # Created + Awarded: one Enrolled


def test_a_save_recording_a_pending_row_of_an_erased_stream_is_refused_as_erased(
    db: Database, members: Members
) -> None:
    """The erasure deleted the stream and the pending row: the save's conditional delete
    of the row fails too, but the refusal names the erasure (the checks ran first; on
    PostgreSQL every statement of the save is read after one sync)."""
    stale = erased_stale_copy(db, members, "erin")
    with pytest.raises(StreamErased) as refused:
        members.save(stale, **{PENDING: {"erin": (7, 1)}})
    assert refused.value.reason == "gone" and refused.value.member_ids == [str(stale.id)]
    assert stream(db, "erin") == []


def test_the_insert_refuses_a_stream_being_erased_or_erased_since_the_read(
    db: Database, members: Members
) -> None:
    store = SqlErasureStore(db)
    before = store.generation()
    now = datetime.now(UTC)
    marker = Marker(store.subject_hash("bob"), str(Member.create_id("bob")), now, ERASING)
    store.put_marker(marker, now + timedelta(days=1))
    with pytest.raises(StreamErased) as refused:
        members.save(earned("bob", "b1"))
    assert refused.value.reason == "erasing"
    store.put_marker(Marker(marker.subject_hash, marker.member_id, now, "done"), now)
    with pytest.raises(StreamErased) as fenced:  # read before the marker was set
        members.save(earned("bob", "b1"), erasure_fence=before)
    assert fenced.value.reason == "fenced"
    assert stream(db, "bob") == []
    members.save(earned("bob", "b1"), erasure_fence=store.generation())
    assert stream(db, "bob") == [1]  # Created + Awarded: one Enrolled
    # other members in the same batch are not written either (one transaction)
    store.put_marker(marker, now + timedelta(days=1))
    bob = members.repository.get(Member.create_id("bob"))
    bob.award("b2", 1, 1, 1, 1, RankLadder(()))
    with pytest.raises(StreamErased):
        members.save(earned("carol", "c1"), earned("dave", "d1"), bob)
    assert stream(db, "carol") == [] and stream(db, "dave") == []


# ------------------------------------------------------- the race, forced with hooks


@pytest.mark.parametrize("command", ["spend", "adjust"])
def test_a_command_loaded_before_the_erasure_cannot_save_after_it(
    fast: Settings, fdb: Database, command: str
) -> None:
    """command loaded -> erasure deletes the stream -> command saves: refused, nothing
    orphaned, and the command answers 404 like one arriving after the erasure."""
    with TestClient(create_app(fast, db=fdb)) as client:
        k = keys(fdb)
        container = client.app.state.container  # type: ignore[attr-defined]
        accounts: Accounts = container.accounts
        adj = {"adjustment_id": "a0", "currency": 50, "rank_points": 5, "reason": "welcome"}
        assert (
            client.post(
                "/v1/members/alice/adjustments", json=adj, headers=k["operator"]
            ).status_code
            == 200
        )
        assert stream(fdb, "alice") == [1, 2, 3]  # Created, Adjusted, RankChanged
        loaded, erased = threading.Event(), threading.Event()
        original = accounts.save

        def hooked(*saved: Member, fence: int | None, **pending: Any) -> None:
            loaded.set()
            assert erased.wait(30)
            original(*saved, fence=fence, **pending)

        accounts.save = hooked  # type: ignore[method-assign]
        answer: dict[str, Any] = {}

        def run() -> None:
            if command == "spend":
                body = {"order_id": "o1", "amount": 10}
                answer["r"] = client.post("/v1/members/alice/spend", json=body, headers=k["shop"])
            else:
                body = {"adjustment_id": "a1", "currency": 5, "rank_points": 0, "reason": "x"}
                answer["r"] = client.post(
                    "/v1/members/alice/adjustments", json=body, headers=k["operator"]
                )

        thread = threading.Thread(target=run)
        thread.start()
        assert loaded.wait(30)
        accounts.save = original  # type: ignore[method-assign]  # the retry saves normally
        # another process erases alice (its own database handle, its own marker cache)
        other = Database(fast)
        try:
            service = build_forget_service(other)
            request = service.request("alice")
            service.run_pending()
            assert service.status(request.request_id).status == "completed"  # type: ignore[union-attr]
        finally:
            other.dispose()
        erased.set()
        thread.join(30)
        response = answer["r"]
        if command == "spend":
            assert response.status_code == 404, response.text
            assert stream(fdb, "alice") == []
        else:  # an operator's adjustment after the erasure starts a fresh account
            assert response.status_code == 200, response.text
            assert response.json()["currency"] == 5
            assert stream(fdb, "alice") == [1, 2, 3]  # Created, Adjusted, RankChanged
        assert orphans(fdb) == 0
        assert client.get("/v1/members/alice", headers=k["shop"]).status_code in (200, 404)
        build_projection(fdb).catch_up()  # the read models pass over everything


def test_a_command_saving_while_the_erasure_runs_is_refused(fast: Settings, fdb: Database) -> None:
    """command loaded -> marker set (erasure under way) -> command saves: refused with
    the being-erased answer; the erasure then deletes everything."""
    with TestClient(create_app(fast, db=fdb)) as client:
        k = keys(fdb)
        accounts: Accounts = client.app.state.container.accounts  # type: ignore[attr-defined]
        adj = {"adjustment_id": "a0", "currency": 50, "rank_points": 5, "reason": "welcome"}
        client.post("/v1/members/alice/adjustments", json=adj, headers=k["operator"])
        other = Database(fast)
        service = build_forget_service(other)
        member = accounts.get("alice")
        fence = accounts.fence()
        request = service.request("alice")  # the marker, committed
        member.spend("o1", 10)
        with pytest.raises(StreamErased) as refused:
            accounts.save(member, fence=fence)
        assert refused.value.reason == "erasing"
        with pytest.raises(MemberBeingErased):
            accounts.refused(refused.value)
        service.run_pending()
        other.dispose()
        assert service.status(request.request_id) is not None
        assert stream(fdb, "alice") == [] and orphans(fdb) == 0


# ------------------------------------------------------------------------ scenarios


def ingest(client: TestClient, key: dict[str, str], user: str, kind: str, at: datetime) -> None:
    event = {
        "event_id": f"{user}-{kind}-{uuid.uuid4().hex[:8]}",
        "user_id": user,
        "type": kind,
        "occurred_at": at.isoformat(),
    }
    body = client.post(BATCHES, json={"events": [event]}, headers=key).json()
    assert body["accepted"] == 1, body


def test_marker_expiry_with_warm_caches_in_the_worker_and_the_api(
    fast: Settings, fdb: Database
) -> None:
    """Alice earns, is forgotten by another process, her marker expires; the worker and
    the API still cache her erased account. New activity starts a fresh account with
    exactly that activity, and every read model keeps moving (bob's too)."""
    worker_members = Members(env=worker_env(fast))
    pipeline = build_pipeline(fdb, worker_members)
    try:
        with TestClient(create_app(fast, db=fdb)) as client:
            k = keys(fdb)
            now = datetime.now(UTC)
            ingest(client, k["ingest"], "alice", "joined_competition", now - timedelta(hours=1))
            ingest(client, k["ingest"], "bob", "joined_competition", now - timedelta(hours=1))
            drain_with(pipeline, fdb)
            build_projection(fdb).catch_up()
            assert client.get("/v1/members/alice", headers=k["shop"]).json()["currency"] == 20
            assert stream(fdb, "alice") == [1]  # cached in the worker and the API

            other = Database(fast)  # another process: its own marker cache
            try:
                service = build_forget_service(other)
                service.request("alice")
                service.run_pending()
                with other.write() as conn:  # retention: the marker expired
                    conn.execute(sa.text("DELETE FROM forget_markers"))
            finally:
                other.dispose()
            assert stream(fdb, "alice") == []

            ingest(client, k["ingest"], "alice", "logged_on", datetime.now(UTC))
            ingest(client, k["ingest"], "bob", "played_game", datetime.now(UTC))
            drain_with(pipeline, fdb)
            assert orphans(fdb) == 0
            assert stream(fdb, "alice") == [1]  # Enrolled (Created, Awarded, ...): fresh
            fresh = client.get("/v1/members/alice", headers=k["shop"])
            assert fresh.status_code == 200, fresh.text
            build_projection(fdb).catch_up()
            history = client.get("/v1/members/alice/history", headers=k["shop"]).json()
            awards = [e for e in history["entries"] if e["kind"] == "award"]
            assert len(awards) == 1 and fresh.json()["currency"] == awards[0]["currency"]
            bob = client.get("/v1/members/bob/history", headers=k["shop"]).json()["entries"]
            assert len([e for e in bob if e["kind"] == "award"]) == 2
    finally:
        worker_members.close()


def test_forget_of_a_member_without_an_account_keeps_later_activity(
    fast: Settings, fdb: Database
) -> None:
    """The request comes for new1 (no account); activity that occurred after it is
    processed while the erasure is under way: the window is refused and retried, and
    once the request completes new1 has a fresh account with exactly that activity."""
    pipeline = build_pipeline(fdb)
    with TestClient(create_app(fast, db=fdb)) as client:
        k = keys(fdb)
        other = Database(fast)
        try:
            service = build_forget_service(other)
            request = service.request("new1")
            ingest(
                client,
                k["ingest"],
                "new1",
                "joined_competition",
                datetime.now(UTC) + timedelta(seconds=1),
            )
            # the window fails, to be retried (on PostgreSQL another session's open
            # transaction may hide the new row from one pass: keep draining)
            with pytest.raises(MemberBeingErased):
                drain_with(pipeline, fdb, timeout=20)
            assert stream(fdb, "new1") == []
            service.run_pending()
            done = service.status(request.request_id)
            assert done is not None and done.status == "completed"
            assert done.erased.get("event_store") == 0
        finally:
            other.dispose()
        drain_with(pipeline, fdb)
        body = client.get("/v1/members/new1", headers=k["shop"])
        assert body.status_code == 200, body.text
        assert body.json()["currency"] == 20
        assert stream(fdb, "new1") == [1]  # Enrolled


def test_a_replayed_spend_on_a_stale_copy_after_the_erasure_is_a_404(settings: Settings) -> None:
    """The API process has not re-read the markers yet (a long refresh) and still caches
    alice when another process erases her: a replay of her order answers 404, not 500."""
    slow = Database(settings.model_copy(update={"marker_refresh_seconds": 60.0}))
    try:
        with TestClient(create_app(slow.settings, db=slow)) as client:
            k = keys(slow)
            adj = {"adjustment_id": "a0", "currency": 50, "rank_points": 0, "reason": "x"}
            client.post("/v1/members/alice/adjustments", json=adj, headers=k["operator"])
            order = {"order_id": "o1", "amount": 10}
            assert (
                client.post("/v1/members/alice/spend", json=order, headers=k["shop"]).status_code
                == 200
            )
            assert client.get("/v1/members/alice", headers=k["shop"]).json()["currency"] == 40
            other = Database(settings)  # the cached copy now holds the order
            try:
                service = build_forget_service(other)
                service.request("alice")
                service.run_pending()
            finally:
                other.dispose()
            replay = client.post("/v1/members/alice/spend", json=order, headers=k["shop"])
            assert replay.status_code == 404, replay.text
            assert stream(slow, "alice") == [] and orphans(slow) == 0
    finally:
        slow.dispose()
