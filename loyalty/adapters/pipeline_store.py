"""Durable pipeline state: per-shard checkpoints, daily cap counters, shard leases."""

from __future__ import annotations

import fcntl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any

import orjson
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from loyalty.adapters.db import Database, psycopg_connection
from loyalty.adapters.ingress_log import create_caps_partition
from loyalty.adapters.lease_session import lease_session
from loyalty.adapters.pending_store import PendingTable, merge
from loyalty.adapters.rollup_store import RollupStore
from loyalty.adapters.tables import (
    pipeline_caps,
    pipeline_checkpoints,
    rule_version_starts,
    rule_versions,
)
from loyalty.application.pending import Contribution, PendingRow
from loyalty.application.pipeline import LeaseLost
from loyalty.application.reporting import ActivityFacts

Position = tuple[int, int]
CapKey = tuple[str, str, date]
SHARD_LEASE_NS = 7_304_119
_IN_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Checkpoint:
    shard: int
    position: Position
    pending: Position | None
    processed_total: int
    awards_total: int
    pending_version: int | None = None
    """The rules version the noted window is weighed under (None: noted before versions
    were noted with windows, or no window noted)."""


def _insert(db: Database, table: sa.Table) -> Any:
    return (postgresql.insert if db.backend == "postgresql" else sqlite.insert)(table)


LOAD_CAPS = (
    "SELECT c.user_id, c.event_type, c.day, c.count "
    "FROM jsonb_array_elements(%s::text::jsonb) AS e CROSS JOIN LATERAL "
    "(SELECT user_id, event_type, day, count FROM pipeline_caps "
    "WHERE user_id = e->>0 AND event_type = e->>1 AND day = (e->>2)::date LIMIT 1) c"
)
"""The caps of a JSON array of keys, one primary-key probe each (PostgreSQL; see
``pending_store.PENDING_AT_REVISION``), in the key's day partition only (pruned at run
time: the day is the probe's parameter). A partition has no other index (the one on the
day, which a plan made on an empty table once chose, reading every cap of the day for
each key, went with migration 0023)."""


def _json_rows(rows: Iterable[tuple[Any, ...]]) -> str:
    """Rows as a JSON array of arrays (dates as ISO strings), for jsonb_array_elements."""
    return orjson.dumps(list(rows)).decode()


class PipelineStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._rollups = RollupStore(db)
        self._caps_days: set[date] = set()
        """Days whose caps partition this store has seen exist (PostgreSQL)."""

    def _ensure_caps_days(self, days: set[date]) -> None:
        """PostgreSQL: the caps partitions of ``days`` (each made with its day's ingress
        partition; made here too for a day whose ingress partition was made before
        migration 0023, or whose caps partition a crash left unmade)."""
        for day in sorted(days - self._caps_days):
            create_caps_partition(self._db, day)
            self._caps_days.add(day)

    def load(self, shard: int) -> Checkpoint:
        c = pipeline_checkpoints.c
        query = sa.select(
            c.txid,
            c.seq,
            c.pending_txid,
            c.pending_seq,
            c.processed_total,
            c.awards_total,
            c.pending_version,
        ).where(c.shard == shard)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            with self._db.write() as conn:
                conn.execute(
                    _insert(self._db, pipeline_checkpoints)
                    .values(shard=shard)
                    .on_conflict_do_nothing()
                )
            return Checkpoint(shard, (0, 0), None, 0, 0)
        pending = None if row[2] is None else (int(row[2]), int(row[3]))
        version = None if pending is None or row[6] is None else int(row[6])
        return Checkpoint(
            shard, (int(row[0]), int(row[1])), pending, int(row[4]), int(row[5]), version
        )

    def set_pending(self, shard: int, start: Position, end: Position) -> int:
        """Record the window ``(start, end]`` about to be awarded, before any award of it
        is saved: only if the checkpoint still stands at ``start`` with no window noted
        (a compare-and-set). Raises :class:`LeaseLost` when it does not: another worker
        has noted or committed a window of this shard since ``start`` was read.

        In the same transaction, after the compare-and-set took the checkpoint row's lock,
        it reads the newest rules version, notes it with the window (the window is weighed
        under it, also when it is re-read after a crash) and, if the shard has no start
        for that version yet, notes ``start`` as where the version took effect in the
        shard (see :meth:`version_starts`). Returns the version (1, the built-in default,
        when none is stored yet)."""
        c = pipeline_checkpoints.c
        with self._db.write() as conn:
            noted = conn.execute(
                pipeline_checkpoints.update()
                .where(
                    c.shard == shard,
                    c.pending_txid.is_(None),
                    c.txid == start[0],
                    c.seq == start[1],
                )
                .values(pending_txid=end[0], pending_seq=end[1])
            ).rowcount
            if noted != 1:
                raise LeaseLost(f"shard {shard}: checkpoint moved from {start}")
            # a statement of its own, after the row lock: a compensation that fixed this
            # shard's start of a version under the same lock committed that version first
            latest = conn.execute(sa.select(sa.func.max(rule_versions.c.version))).scalar()
            version = 1 if latest is None else int(latest)  # 1: the default, stored on use
            conn.execute(
                pipeline_checkpoints.update()
                .where(c.shard == shard)
                .values(pending_version=version)
            )
            conn.execute(
                _insert(self._db, rule_version_starts)
                .values(shard=shard, version=version, txid=start[0], seq=start[1])
                .on_conflict_do_nothing()
            )
            return version

    def version_starts(self, version: int, shards: Iterable[int]) -> dict[int, Position]:
        """Per shard, where ``version`` took effect: the start of the first window noted
        under ``version`` or a newer one. Rows at or before it were weighed under older
        versions; rows after it under ``version`` or newer.

        A shard that has noted no window under ``version`` (or newer) yet gets its start
        fixed now, under the checkpoint row's lock (the lock the noting compare-and-set
        takes): the end of the window noted under an older version if one is noted, else
        the checkpoint's position. Every window noted afterwards reads ``version`` (it is
        stored before this is called) and starts at or after that position."""
        s, c = rule_version_starts.c, pipeline_checkpoints.c
        found: dict[int, Position] = {}
        for shard in shards:
            with self._db.write() as conn:
                conn.execute(
                    _insert(self._db, pipeline_checkpoints)
                    .values(shard=shard)
                    .on_conflict_do_nothing()
                )
                lock = sa.select(c.txid, c.seq, c.pending_txid, c.pending_seq).where(
                    c.shard == shard
                )
                if self._db.backend == "postgresql":
                    lock = lock.with_for_update()
                point = conn.execute(lock).one()
                known = conn.execute(
                    sa.select(s.txid, s.seq)
                    .where(s.shard == shard, s.version >= version)
                    .order_by(s.txid, s.seq)
                    .limit(1)
                ).first()
                if known is None:
                    at = (
                        (int(point[0]), int(point[1]))
                        if point[2] is None
                        else (int(point[2]), int(point[3]))
                    )
                    conn.execute(
                        _insert(self._db, rule_version_starts)
                        .values(shard=shard, version=version, txid=at[0], seq=at[1])
                        .on_conflict_do_nothing()
                    )
                    found[shard] = at
                else:
                    found[shard] = (int(known[0]), int(known[1]))
        return found

    def commit(
        self,
        shard: int,
        start: Position,
        end: Position,
        cap_changes: Mapping[CapKey, int],
        *,
        processed: int,
        awards: int,
        contributions: Sequence[Contribution] = (),
        fence: int | None = None,
        facts: ActivityFacts | None = None,
    ) -> list[PendingRow]:
        """Advance the checkpoint from ``start`` to the noted ``end``, store the cap
        counts, add the window's ``contributions`` to the pending rows and its activity
        ``facts`` to the daily rollups, in one transaction, only if the checkpoint still
        stands at ``start`` with ``end`` noted
        (a compare-and-set, written first: its row lock also orders two commits of one
        window). Raises :class:`LeaseLost` (nothing written) otherwise. Returns the
        members to settle (see ``pending_store.merge``)."""
        c = pipeline_checkpoints.c
        now = datetime.now(UTC)
        if facts:
            self._rollups.sketch_key()  # made (once) before the commit's transaction
        if cap_changes and self._db.backend == "postgresql":
            self._ensure_caps_days({day for _, _, day in cap_changes})
        with self._db.write() as conn:
            moved = conn.execute(
                pipeline_checkpoints.update()
                .where(
                    c.shard == shard,
                    c.txid == start[0],
                    c.seq == start[1],
                    c.pending_txid == end[0],
                    c.pending_seq == end[1],
                )
                .values(
                    txid=end[0],
                    seq=end[1],
                    pending_txid=None,
                    pending_seq=None,
                    processed_total=c.processed_total + processed,
                    awards_total=c.awards_total + awards,
                    updated_at=now,
                )
            ).rowcount
            if moved != 1:
                raise LeaseLost(f"shard {shard}: window ({start}, {end}] not ours to commit")
            if cap_changes and self._db.backend == "postgresql":
                # one statement, the rows as one JSON document: psycopg dumps a list
                # parameter element by element in Python, orjson does it in C
                try:
                    psycopg_connection(conn).execute(
                        "INSERT INTO pipeline_caps (user_id, event_type, day, shard, count) "
                        "SELECT e->>0, e->>1, (e->>2)::date, %s, (e->>3)::int "
                        "FROM jsonb_array_elements(%s::text::jsonb) AS e ON CONFLICT "
                        "(user_id, event_type, day) DO UPDATE SET count = excluded.count",
                        (shard, _json_rows((u, t, d, n) for (u, t, d), n in cap_changes.items())),
                    )
                except psycopg.errors.CheckViolation:
                    # "no partition ... found for row": a day's partition this store saw
                    # is gone (dropped by retention); nothing is written, and the window's
                    # next attempt makes it again
                    self._caps_days.clear()
                    raise
            elif cap_changes:
                stmt = _insert(self._db, pipeline_caps)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["user_id", "event_type", "day"],
                    set_={"count": stmt.excluded.count},
                )
                conn.execute(
                    stmt,
                    [
                        {"user_id": u, "event_type": t, "day": d, "shard": shard, "count": n}
                        for (u, t, d), n in cap_changes.items()
                    ],
                )
            if facts:
                self._rollups.add_window(conn, shard, facts)
            return merge(self._db, conn, shard, end, contributions, now, fence, start)

    def pending_rows(self) -> PendingTable:
        return PendingTable(self._db)

    def load_caps(self, keys: Iterable[CapKey]) -> dict[CapKey, int]:
        wanted = set(keys)
        if not wanted:
            return {}
        if self._db.backend == "postgresql":
            return self._load_caps_pg(wanted)
        users = sorted({k[0] for k in wanted})
        first_day = min(k[2] for k in wanted)
        c = pipeline_caps.c
        found: dict[CapKey, int] = {}
        with self._db.read() as conn:
            for i in range(0, len(users), _IN_CHUNK):
                rows = conn.execute(
                    sa.select(c.user_id, c.event_type, c.day, c.count).where(
                        c.user_id.in_(users[i : i + _IN_CHUNK]), c.day >= first_day
                    )
                )
                for user_id, event_type, day, count in rows:
                    key = (user_id, event_type, day)
                    if key in wanted:
                        found[key] = int(count)
        return found

    def _load_caps_pg(self, wanted: set[CapKey]) -> dict[CapKey, int]:
        """The exact keys, joined on the primary key in one statement."""
        with self._db.read() as conn:
            rows = (
                psycopg_connection(conn)
                .execute(
                    LOAD_CAPS,
                    (_json_rows(wanted),),
                )
                .fetchall()
            )
        return {(u, t, d): int(n) for u, t, d, n in rows}

    def totals(self) -> tuple[int, int]:
        c = pipeline_checkpoints.c
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(c.processed_total), 0),
                    sa.func.coalesce(sa.func.sum(c.awards_total), 0),
                )
            ).one()
        return int(row[0]), int(row[1])

    def positions(self) -> dict[int, Position]:
        c = pipeline_checkpoints.c
        with self._db.read() as conn:
            return {
                int(r[0]): (int(r[1]), int(r[2]))
                for r in conn.execute(sa.select(c.shard, c.txid, c.seq))
            }


class ShardLeases:
    """Exclusive ownership of shards across processes: a session advisory lock per shard
    on PostgreSQL (held on the process's one lease session,
    :mod:`loyalty.adapters.lease_session`, shared by every lease object of the process
    and exclusive between them), a file lock per shard on SQLite. Released when the
    process exits, however it exits.

    A PostgreSQL lease lives exactly as long as its session, which the server can end at
    any moment (a restart, a failover, ``pg_terminate_backend``): a lease is never
    assumed from memory. :meth:`held` asks the server which locks this session holds,
    and :meth:`try_acquire` of a lease believed held asks too. Between two such
    questions the lease can still be lost, so the writes it guards prove themselves
    (the pipeline's checkpoint compare-and-set): the lease keeps workers from doing the
    same work twice, it is not what makes that work correct."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._session = lease_session(db) if db.backend == "postgresql" else None
        self._generation = -1
        self._held: set[int] = set()
        self._files: dict[int, IO[bytes]] = {}

    def _mine(self) -> set[int]:
        """The keys this object holds in the current session (call under its lock)."""
        session = self._session
        assert session is not None
        if self._generation != session.generation:
            self._held.clear()  # they died with an earlier session
            self._generation = session.generation
        return self._held

    def held(self) -> set[int]:
        """The leases this object holds, as the database sees them now (one query on
        PostgreSQL). A lease connection that fails is discarded: every lease is gone."""
        session = self._session
        if session is None:
            return set(self._files)  # flock on an open descriptor: held until closed
        with session.lock:
            mine = self._mine()
            if session.conn is None or not mine:
                mine.clear()
                return set()
            try:
                rows = session.conn.execute(
                    sa.text(
                        "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND pid = pg_backend_pid() AND classid = :ns AND objsubid = 2"
                    ),
                    {"ns": SHARD_LEASE_NS},
                ).scalars()
                found = {int(r) for r in rows}
                session.conn.commit()
            except sa.exc.DBAPIError:
                session.discard()
                self._held.clear()
                return set()
            mine &= found
            for key in [k for k, owner in session.owners.items() if owner is self]:
                if key not in mine:
                    del session.owners[key]
            return set(mine)

    def try_acquire(self, shard: int) -> bool:
        """Take the shard's lease (True also when this object still holds it, which is
        asked of the database; False while another lease object of this process holds
        it). If the lease connection is lost (the database restarted), every lease it
        held is gone: the error is raised and the next calls take the leases anew."""
        session = self._session
        if session is not None:
            with session.lock:
                if shard in self._mine() and shard in self.held():
                    return True
                if session.owners.get(shard, self) is not self:
                    return False  # another lease object of this process holds it
                try:
                    conn = session.connection()
                    # Advisory locks are re-entrant (each lock needs its own unlock): only
                    # ever asked for a key this session does not hold, so each is held once.
                    got = conn.execute(
                        sa.text("SELECT pg_try_advisory_lock(:ns, :shard)"),
                        {"ns": SHARD_LEASE_NS, "shard": shard},
                    ).scalar()
                    conn.commit()
                except Exception:
                    session.discard()
                    self._held.clear()
                    raise
                if got:
                    self._mine().add(shard)
                    session.owners[shard] = self
                return bool(got)
        if shard in self._files:
            return True
        path = self._db.settings.sqlite_path
        handle = open(path.with_name(f"{path.name}.shard-{shard}.lock"), "a+b")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._files[shard] = handle
        return True

    def _release_leases(self) -> None:
        """Unlock this object's keys; the session ends when no object holds any more
        (closing a pooled connection would keep its session, and locks, alive). The keys
        are unlocked before the session closes: a closed session's locks go only when
        its server backend has exited, a moment later, and a lease released must be
        free at once (another job of the process takes it next)."""
        session = self._session
        if session is None:
            return
        with session.lock:
            mine = self._mine()
            for key in [k for k, owner in session.owners.items() if owner is self]:
                del session.owners[key]
            if session.conn is None:
                mine.clear()
                return
            try:
                for key in sorted(mine):
                    session.conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:ns, :key)"),
                        {"ns": SHARD_LEASE_NS, "key": key},
                    )
                session.conn.commit()
            except sa.exc.DBAPIError:
                session.discard()  # the session, and its locks, are gone anyway
            else:
                if not session.owners:
                    session.discard()
            mine.clear()

    def release_all(self) -> None:
        self._release_leases()
        for handle in self._files.values():
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._files.clear()


def erase_caps(db: Database, user_id: str) -> int:
    """Forget-me: delete the member's daily cap counters."""
    with db.write() as conn:
        result = conn.execute(
            sa.text("DELETE FROM pipeline_caps WHERE user_id = :u"), {"u": user_id}
        )
        return int(result.rowcount)
