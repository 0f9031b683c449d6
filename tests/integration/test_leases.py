"""Leases die with their database session, and the writes they guard prove themselves."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.lease_keys import JOB_LEASES
from loyalty.adapters.pipeline_store import SHARD_LEASE_NS, ShardLeases
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.retention_store import create_retention_store
from loyalty.application.accounts import Accounts, AwardCommand, Members
from loyalty.application.projections import PROJECTION_NAME, MemberProjection, ProjectedBatch
from loyalty.config import Settings
from loyalty.domain.ranks import Rank, RankLadder
from tests.conftest import backends
from tests.e2e.live import wait_for

LADDER = RankLadder((Rank("bronze", 0), Rank("silver", 30)))


def terminate_lease_sessions(url: str) -> int:
    """What a database restart or failover does to the sessions holding leases."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND classid = %s AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            (SHARD_LEASE_NS,),
        ).fetchall()
    return len(rows)


@backends("postgresql")
def test_a_lease_is_not_held_from_memory_after_its_session_died(settings: Settings) -> None:
    a_db, b_db = Database(settings), Database(settings)
    a, b = ShardLeases(a_db), ShardLeases(b_db)
    try:
        assert a.try_acquire(3) and a.try_acquire(4)
        assert a.try_acquire(3)  # still held: asked again, not re-locked (re-entrant locks)
        assert a.held() == {3, 4}
        assert not b.try_acquire(3)
        assert terminate_lease_sessions(settings.database_url) == 2
        assert a.held() == set()  # the session is gone, and so are its leases
        assert b.try_acquire(3)  # another worker takes the shard over
        assert not a.try_acquire(3)  # and the first never believes it still has it
        assert a.try_acquire(4)  # a lease nobody took is taken again on a new session
        assert a.held() == {4} and b.held() == {3}
        a.release_all()
        # a's last lease ends with its session: the server drops the lock when that backend
        # has exited, a moment after the connection closed (workers ask again every 2 s)
        wait_for(lambda: b.try_acquire(4), timeout=10, what="lease 4 after a's session closed")
        assert b.held() == {3, 4}
    finally:
        a.release_all()
        b.release_all()
        a_db.dispose()
        b_db.dispose()


@backends("postgresql")
def test_a_lease_asked_again_and_again_is_released_by_one_release(settings: Settings) -> None:
    """pg_try_advisory_lock is re-entrant: asking for a held lease must not stack locks
    that outlive release_all's unlock-by-closing."""
    a_db, b_db = Database(settings), Database(settings)
    a, b = ShardLeases(a_db), ShardLeases(b_db)
    try:
        for _ in range(5):
            assert a.try_acquire(7)
        with psycopg.connect(settings.database_url) as conn:
            count = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                "AND objid = 7 AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())",  # not other sessions' databases
                (SHARD_LEASE_NS,),
            ).fetchone()
        assert count == (1,)
        a.release_all()
        assert b.try_acquire(7)
    finally:
        a.release_all()
        b.release_all()
        a_db.dispose()
        b_db.dispose()


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    app = Members(env=event_store_env(settings))
    yield app
    app.close()


class Interleaved(ReadModels):
    """Read models whose next ``apply`` first lets another projection run."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.before_apply: list[MemberProjection] = []
        self.refused = 0

    def apply(self, name: str, batch: ProjectedBatch) -> bool:
        while self.before_apply:
            self.before_apply.pop().catch_up()
        applied = super().apply(name, batch)
        self.refused += not applied
        return applied


def test_a_projection_batch_read_before_another_runner_moved_on_is_not_applied(
    db: Database, members: Members
) -> None:
    """Two projection runners (the lease of one died with its session): the batch of the
    stale one is read, then the other applies everything; the stale batch must not be
    applied on top (each balance would count twice)."""
    accounts = Accounts(members)
    for r in range(3):
        accounts.award_many(
            [AwardCommand(f"u{u}", f"w{r}", 10 + u, 5, 1, 1) for u in range(12)], LADDER
        )
    store = Interleaved(db)
    stale = MemberProjection(members, store, batch_size=20)
    store.before_apply.append(MemberProjection(members, ReadModels(db), batch_size=7))
    assert stale.step() == 0  # its batch was refused: the tracking position had moved
    assert store.refused == 1
    stale.catch_up()
    head = members.recorder.max_notification_id()
    assert ReadModels(db).position(PROJECTION_NAME) == head
    for user_id, _mid, currency, points, _lifetime, _at in ReadModels(db).snapshot()[
        "member_balances"
    ]:
        member = accounts.get(user_id)
        assert (currency, points) == (member.currency, member.rank_points)


def test_each_background_job_has_a_lease_of_its_own(settings: Settings) -> None:
    """A job holding its lease (a webhook runner delivers for hours) never stops another
    job: retention once shared its key with the webhook runner and, on PostgreSQL, never
    ran beside it, so ingress grew without bound."""
    holder_db, other_db = Database(settings), Database(settings)
    try:
        for name, held in JOB_LEASES.items():
            holder = ShardLeases(holder_db)
            assert holder.try_acquire(held), name
            try:
                other = ShardLeases(other_db)
                try:
                    for other_name, key in JOB_LEASES.items():
                        if key != held:
                            assert other.try_acquire(key), f"{name} blocks {other_name}"
                    assert not other.try_acquire(held)  # the lease itself still excludes
                finally:
                    other.release_all()
                with create_retention_store(other_db).lease() as leased:
                    assert leased == (name != "retention"), name
            finally:
                holder.release_all()
    finally:
        holder_db.dispose()
        other_db.dispose()
