"""The eventsourcing library's application recorders, ours in two ways.

**The erasure guard (both backends).** Every insert of a batch of stored events checks,
in its own transaction and after the library's serialization point (``LOCK TABLE ... IN
EXCLUSIVE MODE`` on PostgreSQL; SQLite's single write lock, held from the first insert),
that it does not write into a member stream that is being or has been erased:

- *no orphans*: for each stream in the batch whose lowest version is past the first, the
  event just before it must exist. A save from any stale copy of an erased aggregate (a
  cache in any process, the marker expired or not) finds its predecessor gone;
- *not while erasing*: no stream with a forget marker in state ``erasing`` is written to;
- *not from before the erasure*: a caller may pass ``erasure_fence=N``, the erasure
  generation it had read before it loaded what it saves; a stream whose marker was set at
  a later generation is refused (what the caller read may predate the erasure).

Forget-me commits the marker before it deletes the stream, and deletes it under a lock
that conflicts with the insert's (PostgreSQL: a DELETE's ROW EXCLUSIVE against the
insert's EXCLUSIVE; SQLite: the write lock), so either the insert commits first (and the
deletion removes what it wrote) or it runs after the marker is visible (and is refused).
A refusal raises :class:`~loyalty.application.accounts.StreamErased`, an
``IntegrityError`` with the reason and the stream ids, inside the rolled-back transaction.
Without a ``forget_markers`` table (the library's own test cases) only the first check runs.

**Pending consumed (both backends).** A save may carry ``pending_consumed={user_id:
(txid, seq)}`` (``loyalty.application.pending.PENDING``): the pending rows its events
record. The insert deletes each row only if it is still at that revision, in its own
transaction; if any is not, it raises :class:`~loyalty.application.pending.PendingMoved`
(an ``IntegrityError``) and the events are rolled back with it. So a recording and the
removal of what it recorded commit together or not at all.

**PostgreSQL: one JSON parameter.** psycopg dumps a list parameter element by element in
Python; the library's insert of an award group (an array of ``stored_event`` composites)
spent most of its client time there. Here the rows go as one JSON text (built by orjson,
in C) that PostgreSQL unpacks in order (``WITH ORDINALITY``), so notification ids follow
the events' order exactly as the library's own statement does. Everything else (the table
lock, NOTIFY, returned notification ids, selects) is the library's; the library's own
recorder test cases run against both classes (tests/integration/test_event_recorder.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresFactory,
)
from eventsourcing.sqlite import (
    SQLiteAggregateRecorder,
    SQLiteApplicationRecorder,
    SQLiteCursor,
    SQLiteFactory,
)
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from loyalty.adapters.pending_store import PENDING_AT_REVISION
from loyalty.application.accounts import FENCE, StreamErased
from loyalty.application.pending import EXPLAINED, PENDING, PendingMoved

TOPIC = f"{__name__}:JsonInsertApplicationRecorder"
SQLITE_TOPIC = f"{__name__}:GuardedSQLiteApplicationRecorder"
MARKERS_TABLE = "forget_markers"
NO_FENCE = 2**62


def predecessors(stored_events: Iterable[StoredEvent]) -> list[tuple[Any, int]]:
    """(stream, version) of the event that must already exist before each stream's
    lowest version in the batch (none for a batch that starts a stream)."""
    lowest: dict[Any, int] = {}
    for e in stored_events:
        known = lowest.get(e.originator_id)
        if known is None or e.originator_version < known:
            lowest[e.originator_id] = e.originator_version
    return [(oid, v - 1) for oid, v in lowest.items() if v > 1]


def refusal(rows: Iterable[tuple[str, str]]) -> StreamErased | None:
    """The error for the check's rows (stream id, why), or None when there are none."""
    found = list(rows)
    if not found:
        return None
    reasons = {why for _, why in found}
    reason = next(r for r in ("erasing", "fenced", "gone") if r in reasons)
    return StreamErased(reason, sorted({str(m) for m, _ in found}))


def _consumed(kwargs: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The pending rows a save records, as (user_id, txid, seq) in user id order (the
    order every writer locks them in)."""
    consumed = kwargs.get(PENDING) or {}
    return sorted((u, int(p[0]), int(p[1])) for u, p in consumed.items())


_EXPLAIN_COLUMNS = (
    "user_id, award_id, kind, rule_version, event_count, exact_currency, exact_rank_points, "
    "currency, rank_points, fraction_currency, fraction_rank_points, shard, from_txid, "
    "from_seq, upto_txid, upto_seq, summary, recorded_at"
)
NO_SUMMARY = '{"rule_versions":[],"types":{}}'
"""The summary of a pending row from before explanations (its sums are then partial)."""


EXPLAIN_RECORDED = (
    f"INSERT INTO award_explanations ({_EXPLAIN_COLUMNS}) "
    "SELECT p.user_id, e->>3, 'award', p.rule_version, p.event_count, "
    "p.currency, p.rank_points, (e->>4)::bigint, (e->>5)::bigint, e->>6, "
    "e->>7, p.shard, p.from_txid, p.from_seq, p.upto_txid, p.upto_seq, "
    "COALESCE(p.explain, %s), now() "
    "FROM jsonb_array_elements(%s::text::jsonb) e "
    f"CROSS JOIN LATERAL ({PENDING_AT_REVISION.format('*')}) p "
    "ON CONFLICT (user_id, award_id) DO NOTHING"
)
"""Each recorded pending row's explanation, kept with its award (PostgreSQL; params: the
summary of a row without one, the JSON array of ``_explained`` rows)."""
DELETE_RECORDED = (
    "WITH d AS (DELETE FROM pipeline_pending p "
    "USING jsonb_array_elements(%s::text::jsonb) e "
    f"CROSS JOIN LATERAL ({PENDING_AT_REVISION.format('ctid')}) k "
    "WHERE p.ctid = k.ctid RETURNING 1) "
    "SELECT 1 / (CASE WHEN count(*) = %s THEN 1 ELSE 0 END) AS ok FROM d"
)
"""Delete the recorded pending rows, each only at the revision read (PostgreSQL; params:
the JSON array of ``_consumed`` keys, their count): fewer deleted divides by zero."""


def _explained(kwargs: dict[str, Any]) -> list[list[Any]]:
    """(user_id, txid, seq, award_id, currency, rank_points, fraction_currency,
    fraction_rank_points) of the awards that record the consumed rows (see EXPLAINED)."""
    return [list(e) for e in kwargs.get(EXPLAINED) or ()]


def _fence(kwargs: dict[str, Any]) -> int:
    fence = kwargs.get(FENCE)
    return NO_FENCE if fence is None else int(fence)


class JsonInsertApplicationRecorder(PostgresApplicationRecorder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        schema = Identifier(self.datastore.schema)
        table = Identifier(self.events_table_name)
        id_type = Identifier(self.datastore.originator_id_type)
        self.insert_events_statement = SQL(
            "INSERT INTO {schema}.{table} AS t "
            "(originator_id, originator_version, topic, state) "
            "SELECT (e->>0)::{id_type}, (e->>1)::bigint, e->>2, decode(e->>3, 'hex') "
            "FROM jsonb_array_elements(%s::text::jsonb) WITH ORDINALITY AS x(e, n) "
            "ORDER BY n RETURNING notification_id"
        ).format(schema=schema, table=table, id_type=id_type)
        # the streams and versions as one JSON text (as the insert's rows): psycopg's
        # dump of a list of UUIDs was 4 % of an expiry run
        self._gone_statement = SQL(
            "SELECT x.id::text AS member_id FROM jsonb_array_elements(%s::text::jsonb) AS e "
            "CROSS JOIN LATERAL (SELECT (e->>0)::{id_type} AS id, (e->>1)::bigint AS v) x "
            "LEFT JOIN LATERAL (SELECT 1 AS found FROM {schema}.{table} s "
            "WHERE s.originator_id = x.id AND s.originator_version = x.v LIMIT 1) f ON true "
            "WHERE f.found IS NULL"
        ).format(schema=schema, table=table, id_type=id_type)
        self._markers_statement = SQL(
            "SELECT member_id, CASE WHEN state = 'erasing' THEN 'erasing' ELSE 'fenced' END "
            "AS why FROM {schema}.{markers} WHERE member_id = ANY(%s::text[]) "
            "AND (state = 'erasing' OR seq > %s)"
        ).format(schema=schema, markers=Identifier(MARKERS_TABLE))
        self._has_markers: bool | None = None

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """The library's insert (one pipeline, one transaction), except that a failure
        leaves the transaction by raising through it. The library catches it inside and
        re-raises after, so the transaction ends in a COMMIT, which the server turns into
        a rollback but psycopg does not see as one: it keeps the names of the statements
        it prepared, and a statement queued behind the failure on its sixth run (when
        psycopg prepares it) was never prepared on the server. Every later save on that
        connection running it failed with 'prepared statement "_pg3_N" does not exist'
        (one lock timeout was enough to spoil a pooled connection for good). On a
        rollback psycopg forgets its names and deallocates them on the server."""
        if self.datastore.enable_db_functions:  # one statement: nothing queued behind
            ids: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
            return ids
        with self.datastore.get_connection() as conn:
            with conn.pipeline() as pipeline, conn.transaction():
                with conn.cursor() as curs:
                    self._insert_events(curs, stored_events, **kwargs)
                if not stored_events:
                    return None
                with conn.cursor() as curs, conn.cursor() as gone, conn.cursor() as marked:
                    checked = self._insert_stored_events(
                        curs, stored_events, gone, marked, **kwargs
                    )
                    # One round trip for the lock, the checks, the insert and the deletes (a
                    # uniqueness violation or a moved pending row raises here, not at the
                    # commit); the checks' rows are read after it, and a refusal raises
                    # through the transaction: nothing inserted is committed.
                    try:
                        pipeline.sync()
                    except psycopg.errors.DivisionByZero as exc:
                        # the checks ran before the delete: an erasure is the reason to give
                        raise refusal(checked()) or PendingMoved(
                            [u for u, _, _ in _consumed(kwargs)]
                        ) from exc
                    error = refusal(checked())
                    if error is not None:
                        raise error
                    return self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)

    def _markers_exist(self, curs: Cursor[DictRow]) -> bool:
        if not self._has_markers:
            curs.execute(
                "SELECT to_regclass(%s) IS NOT NULL AS found",
                (f'"{self.datastore.schema}"."{MARKERS_TABLE}"',),
            )
            row = curs.fetchone()
            self._has_markers = bool(row and row["found"])
        return self._has_markers

    def _check_erasure(
        self,
        gone: Cursor[DictRow],
        marked: Cursor[DictRow],
        stored_events: Sequence[StoredEvent],
        fence: int,
    ) -> Callable[[], list[tuple[str, str]]]:
        """Queue the erasure guard's two checks (a predecessor gone; a marker erasing, or
        newer than ``fence``); the returned function reads their rows once the pipeline
        has synced. Under the insert's lock: an erasure commits before them or waits."""
        before = predecessors(stored_events)
        if before:
            gone.execute(self._gone_statement, (orjson.dumps(before).decode(),))
        markers = self._markers_exist(marked)
        if markers:
            ids = sorted({str(e.originator_id) for e in stored_events})
            marked.execute(self._markers_statement, (ids, fence))

        def rows() -> list[tuple[str, str]]:
            found = [(r["member_id"], "gone") for r in gone.fetchall()] if before else []
            if markers:
                found += [(r["member_id"], r["why"]) for r in marked.fetchall()]
            return found

        return rows

    def _insert_stored_events(  # type: ignore[override]
        self,
        curs: Cursor[DictRow],
        stored_events: Sequence[StoredEvent],
        gone: Cursor[DictRow],
        marked: Cursor[DictRow],
        **kwargs: Any,
    ) -> Callable[[], list[tuple[str, str]]]:
        """Queue the save's statements in the pipeline, none read before the sync: the
        lock, the erasure checks, the notification, the insert, the explanations and the
        pending rows' conditional delete (a mismatch divides by zero in the database).
        Returns the erasure checks' reader."""
        self._lock_table(curs)
        checked = self._check_erasure(gone, marked, stored_events, _fence(kwargs))
        self._notify_channel(curs)
        rows = orjson.dumps(
            [
                (str(e.originator_id), e.originator_version, e.topic, e.state.hex())
                for e in stored_events
            ]
        ).decode()
        curs.execute(query=self.insert_events_statement, params=(rows,))
        explained = _explained(kwargs)
        if explained:
            # each recorded row's explanation is kept with its award (same transaction)
            with curs.connection.cursor() as copy:
                copy.execute(
                    EXPLAIN_RECORDED,
                    (NO_SUMMARY, orjson.dumps(explained).decode()),
                )
        consumed = _consumed(kwargs)
        if consumed:
            with curs.connection.cursor() as delete:
                delete.execute(DELETE_RECORDED, (orjson.dumps(consumed).decode(), len(consumed)))
        return checked


class GuardedSQLiteApplicationRecorder(SQLiteApplicationRecorder):
    """The library's SQLite application recorder with the erasure guard. The checks run
    after the inserts: the first insert takes the database's write lock (a read first
    would pin a snapshot that a concurrent commit makes stale, failing the upgrade)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._has_markers = False

    def _markers_exist(self, c: SQLiteCursor) -> bool:
        if not self._has_markers:
            c.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MARKERS_TABLE,)
            )
            self._has_markers = c.fetchone() is not None
        return self._has_markers

    @staticmethod
    def _key(originator_id: Any) -> str:
        return originator_id.hex if isinstance(originator_id, UUID) else str(originator_id)

    def _insert_events(
        self,
        c: SQLiteCursor,
        stored_events: Sequence[StoredEvent],
        **kwargs: Any,
    ) -> Sequence[int] | None:
        returning = super()._insert_events(c, stored_events, **kwargs)
        rows: list[tuple[str, str]] = []
        before = predecessors(stored_events)
        for start in range(0, len(before), 400):
            part = before[start : start + 400]
            values = ",".join("(?,?)" for _ in part)
            c.execute(
                f"WITH x(id, v) AS (VALUES {values}) SELECT x.id FROM x WHERE NOT EXISTS "
                f"(SELECT 1 FROM {self.events_table_name} s "
                "WHERE s.originator_id = x.id AND s.originator_version = x.v)",
                [p for oid, v in part for p in (self._key(oid), v)],
            )
            gone = {r[0] for r in c.fetchall()}
            rows += [(str(oid), "gone") for oid, _ in part if self._key(oid) in gone]
        if self._markers_exist(c):
            ids = sorted({str(e.originator_id) for e in stored_events})
            for start in range(0, len(ids), 800):
                chunk = ids[start : start + 800]
                c.execute(
                    "SELECT member_id, CASE WHEN state = 'erasing' THEN 'erasing' "
                    f"ELSE 'fenced' END FROM {MARKERS_TABLE} "
                    f"WHERE member_id IN ({','.join('?' * len(chunk))}) "
                    "AND (state = 'erasing' OR seq > ?)",
                    [*chunk, _fence(kwargs)],
                )
                rows += [(r[0], r[1]) for r in c.fetchall()]
        error = refusal(rows)
        if error is not None:
            raise error
        for user_id, txid, seq, award_id, currency, points, f_currency, f_points in _explained(
            kwargs
        ):
            c.execute(
                f"INSERT INTO award_explanations ({_EXPLAIN_COLUMNS}) "
                "SELECT user_id, ?, 'award', rule_version, event_count, currency, rank_points, "
                "?, ?, ?, ?, shard, from_txid, from_seq, upto_txid, upto_seq, "
                "COALESCE(explain, ?), ? "
                "FROM pipeline_pending WHERE user_id = ? AND upto_txid = ? AND upto_seq = ? "
                "ON CONFLICT (user_id, award_id) DO NOTHING",
                (
                    award_id,
                    currency,
                    points,
                    f_currency,
                    f_points,
                    NO_SUMMARY,
                    datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
                    user_id,
                    txid,
                    seq,
                ),
            )
        moved = []
        for user_id, txid, seq in _consumed(kwargs):
            c.execute(
                "DELETE FROM pipeline_pending WHERE user_id = ? AND upto_txid = ? AND upto_seq = ? "
                "RETURNING user_id",
                (user_id, txid, seq),
            )
            if not c.fetchall():
                moved.append(user_id)
        if moved:
            raise PendingMoved(moved)
        return returning


# ------------------------------------------------------------------ snapshots
#
# A snapshot is taken after its events were saved, in a transaction of its own. Without
# a check, a snapshot inserted after forget-me deleted the stream would bring the erased
# account back (a load starts from the latest snapshot). So a snapshot is stored only if
# the event it stands for still exists, checked in the snapshot's own transaction under a
# lock that conflicts with the erasure's DELETE: on PostgreSQL ``FOR KEY SHARE`` on that
# event row (the DELETE waits for the snapshot to commit, and then deletes it with the
# stream in its own transaction; or the snapshot's SELECT waits for the DELETE and finds
# nothing); on SQLite the write lock, taken by the insert before the check.


def _events_table(snapshots_table: str) -> str:
    """``members_snapshots`` -> ``members_events``; ``stored_snapshots`` -> ``stored_events``."""
    assert snapshots_table.endswith("_snapshots"), snapshots_table
    return snapshots_table[: -len("_snapshots")] + "_events"


class GuardedPostgresSnapshotRecorder(PostgresAggregateRecorder):
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        if not stored_events:
            return None
        events = Identifier(self.datastore.schema, _events_table(self.events_table_name))
        keys = orjson.dumps(
            [(str(e.originator_id), e.originator_version) for e in stored_events]
        ).decode()
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            curs.execute(
                SQL(
                    "SELECT s.originator_id, s.originator_version "
                    "FROM jsonb_array_elements(%s::text::jsonb) AS k CROSS JOIN LATERAL "
                    "(SELECT originator_id, originator_version FROM {} "
                    "WHERE originator_id = (k->>0)::uuid AND originator_version = (k->>1)::bigint "
                    "LIMIT 1 FOR KEY SHARE) s"
                ).format(events),
                (keys,),
            )
            present = {(str(r["originator_id"]), int(r["originator_version"])) for r in curs}
            kept = [
                e for e in stored_events if (str(e.originator_id), e.originator_version) in present
            ]
            if kept:
                self._insert_stored_events(curs, kept, **kwargs)
        return None


class GuardedSQLiteSnapshotRecorder(SQLiteAggregateRecorder):
    def _insert_events(
        self,
        c: SQLiteCursor,
        stored_events: Sequence[StoredEvent],
        **kwargs: Any,
    ) -> Sequence[int] | None:
        returning = super()._insert_events(c, stored_events, **kwargs)
        events = _events_table(self.events_table_name)
        for e in stored_events:
            key = GuardedSQLiteApplicationRecorder._key(e.originator_id)
            c.execute(
                f"SELECT 1 FROM {events} WHERE originator_id = ? AND originator_version = ?",
                (key, e.originator_version),
            )
            if c.fetchone() is None:  # erased meanwhile: no snapshot of it either
                c.execute(
                    f"DELETE FROM {self.events_table_name} "
                    "WHERE originator_id = ? AND originator_version = ?",
                    (key, e.originator_version),
                )
        return returning


APPLICATION_NAME = "LOYALTY_APPLICATION_NAME"
"""Environment key of the application_name given to the event store's connections."""

_SHARED: dict[tuple[Any, ...], list[Any]] = {}  # key -> [datastore, users]
_SHARED_LOCK = threading.Lock()


class GuardedPostgresFactory(PostgresFactory):
    """The library's PostgreSQL persistence with guarded snapshots (the application
    recorder is chosen by ``APPLICATION_RECORDER_TOPIC``).

    **One pool per process.** The library builds a connection pool per application (per
    ``Members``, and a process builds several: the pipeline's, the expiry's, the feed's):
    each would open up to its own size. Every factory of the same database, user, schema
    and pool settings in a process shares the first one's datastore (its pool), so the
    event store's share of ``LOYALTY_DB_POOL_SIZE`` bounds them all; the pool closes when
    the last application using it closes."""

    aggregate_recorder_class = GuardedPostgresSnapshotRecorder

    def __init__(self, env: Any) -> None:
        super().__init__(env)  # builds a datastore whose pool is not open: no connection
        own = self.datastore
        kwargs = own.pool.kwargs
        assert isinstance(kwargs, dict)  # the library passes a dict
        name = self.env.get(APPLICATION_NAME)
        if name:
            kwargs["application_name"] = name
        self._shared_key: tuple[Any, ...] | None = (
            tuple(sorted((k, str(v)) for k, v in kwargs.items() if k != "row_factory")),
            own.schema,
            own.pool.min_size,
            own.pool.max_size,
            own.pool.timeout,
            own.lock_timeout,
            own.pre_ping,
        )
        with _SHARED_LOCK:
            entry = _SHARED.get(self._shared_key)
            if entry is None or entry[0].pool.closed and entry[0].pool._opened:  # noqa: SLF001
                entry = _SHARED[self._shared_key] = [own, 0]
            entry[1] += 1
            self.datastore = entry[0]
        if self.datastore is not own:
            own.close()  # never opened

    def close(self) -> None:
        key = getattr(self, "_shared_key", None)
        self._shared_key = None  # once: Application.close and a later close
        if key is None:
            return
        with _SHARED_LOCK:
            entry = _SHARED.get(key)
            if entry is None or entry[0] is not self.datastore:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _SHARED[key]
        self.datastore.close()


def shared_datastores() -> list[PostgresDatastore]:
    """The event store datastores (pools) this process shares (for tests and doctor)."""
    with _SHARED_LOCK:
        return [entry[0] for entry in _SHARED.values()]


class GuardedSQLiteFactory(SQLiteFactory):
    """The library's SQLite persistence with guarded snapshots."""

    aggregate_recorder_class = GuardedSQLiteSnapshotRecorder


POSTGRES_FACTORY_TOPIC = f"{__name__}:GuardedPostgresFactory"
SQLITE_FACTORY_TOPIC = f"{__name__}:GuardedSQLiteFactory"
