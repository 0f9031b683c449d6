"""``retention``: expire one day of N ingress events on PostgreSQL, ours against the
naive way, on copies of the same rows in one database of its own.

Data: two day partitions (DAY_A, then DAY_B) of N rows each, generated server-side with
the pipeline benchmark's mix, every shard's checkpoint set past them (all processed).
The naive copy is one unpartitioned table holding the same rows (day A first, as they
would arrive) with the same indexes plus ``UNIQUE (source, event_id)`` and an index on
``occurred_at`` (the SQLite design).

- ours: ``build_retention(db).run(AS_OF)`` — what ``loyalty retention run --as-of``
  runs (without the interpreter start): DETACH PARTITION CONCURRENTLY, check, DROP;
  and the partitions of the day after AS_OF (AS_OF's own exist, as a daily run's
  previous run left them).
- baseline: ``DELETE FROM naive WHERE occurred_at < day B`` then plain ``VACUUM naive``.
  (``VACUUM FULL``, which would give the bytes back under an ACCESS EXCLUSIVE lock, is
  timed too, for the note.)

Bytes returned to the OS: ours ``pg_database_size`` before minus after; the baseline's
``pg_total_relation_size(naive)`` before minus after; both as a share of day A's
partition size (the same rows). Locks: while each runs, a sampler reads ``pg_locks``
every 5 ms for granted ACCESS EXCLUSIVE locks, and a prober inserts one row into live
data and reads the first row in the pipeline's order (shard, txid, seq) every 20 ms: its worst
latency shows any blocking.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from benchmarks.fill import FILL_SQL, SHARDS
from benchmarks.framework import Context, Result, benchmark
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import (
    PostgresIngressLog,
    create_keys_partition,
    day_start,
    key_generation,
    partition_name,
)
from loyalty.application.ingress import shard_of
from loyalty.config import Settings

DAY_A, DAY_B = date(2030, 3, 1), date(2030, 3, 2)
# as of this time, DAY_A lies wholly outside the 7-day window and DAY_B does not
AS_OF = datetime(2030, 3, 9, 1, tzinfo=UTC)
USERS = 10_000
NAIVE = "naive_ingress"
FILL_TX = 100_000


def fill_day(conn: psycopg.Connection[Any], day: date, n: int, prefix: str) -> None:
    shard_map = [shard_of(f"user-{u:05d}", SHARDS) for u in range(USERS)]
    for lo in range(0, n, FILL_TX):
        conn.execute(
            FILL_SQL,
            {
                "shards": shard_map,
                "prefix": prefix + "-",
                "base": day_start(day + timedelta(days=1)) - timedelta(milliseconds=1),
                "span": 86_399_000,
                "users": USERS,
                "lo": lo,
                "hi": min(n, lo + FILL_TX) - 1,
            },
        )


class LockWatch:
    """Granted ACCESS EXCLUSIVE locks seen (relation names), and the worst latency of a
    small write + read on live data, while a block runs."""

    def __init__(self, url: str, probe_sql: list[str], live: set[int] | None = None) -> None:
        self._url = url
        self._live = live or set()
        self.on_live: set[str] = set()
        self._probe_sql = probe_sql
        self._stop = threading.Event()
        self.exclusive: set[str] = set()
        self.probe_max_ms = 0.0
        self.slow: list[tuple[float, int, float]] = []  # (at, statement, ms) over 50 ms
        self.probes = 0
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]

    def _sample(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            for _ in range(200 * 600):  # bounded: 10 min at 5 ms
                rows = conn.execute(
                    "SELECT coalesce(c.relname, l.relation::text), l.relation::int8 "
                    "FROM pg_locks l "
                    "LEFT JOIN pg_class c ON c.oid = l.relation "
                    "WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' "
                    "AND l.granted AND l.pid <> pg_backend_pid() AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                ).fetchall()
                self.exclusive.update(r[0] for r in rows)
                self.on_live.update(r[0] for r in rows if r[1] in self._live)
                if self._stop.wait(0.005):
                    return

    def _probe(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '30s'")
            for i in range(50 * 600):  # bounded: 10 min at 20 ms
                t0 = time.perf_counter()
                try:
                    for k, statement in enumerate(self._probe_sql):
                        ts = time.perf_counter()
                        conn.execute(statement.replace("{i}", str(i)))
                        ms = (time.perf_counter() - ts) * 1000
                        if ms > 50:
                            self.slow.append((ts, k, ms))
                except psycopg.Error as exc:
                    self.errors.append(str(exc).splitlines()[0])
                self.probe_max_ms = max(self.probe_max_ms, (time.perf_counter() - t0) * 1000)
                self.probes += 1
                if self._stop.wait(0.02):
                    return

    def __enter__(self) -> LockWatch:
        for t in self._threads:
            t.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)


def live_oids(conn: psycopg.Connection[Any], tables: list[str]) -> set[int]:
    """OIDs of ``tables``, their partitions, indexes and TOAST tables (live data)."""
    rows = conn.execute(
        "WITH t AS (SELECT c.oid FROM pg_class c WHERE c.relname = ANY(%s) "
        "UNION SELECT i.inhrelid FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
        "WHERE p.relname = ANY(%s)) "
        "SELECT oid FROM t UNION SELECT indexrelid FROM pg_index WHERE indrelid IN "
        "(SELECT oid FROM t) UNION SELECT reltoastrelid FROM pg_class WHERE oid IN "
        "(SELECT oid FROM t) AND reltoastrelid <> 0",
        (tables, tables),
    ).fetchall()
    return {int(r[0]) for r in rows}


class TimedStore:
    """Times the steps of a retention store (a breakdown of where retention spends)."""

    STEPS = (
        "ensure_days",
        "expired_days",
        "_unprocessed",
        "_autocommit",
        "expire_day",
        "delete_caps_before",
        "expire_keys",
        "delete_expired_markers",
        "finish",
    )

    def __init__(self, store: Any) -> None:
        self.spent: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []
        for name in self.STEPS:
            fn = getattr(store, name, None)
            if fn is not None:
                setattr(store, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                t1 = time.perf_counter()
                self.spent[name] = self.spent.get(name, 0.0) + t1 - t0
                self.spans.append((name, t0, t1))

        return timed


def _size(conn: psycopg.Connection[Any], what: str) -> int:
    row = conn.execute(what).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def measure(ctx: Context) -> dict[str, Any]:
    from loyalty.adapters.retention_store import create_retention_store
    from loyalty.application.retention import Retention

    n = ctx.pick(smoke=2_000, quick=200_000, full=1_000_000)
    url = ctx.new_pg_database("retention")
    db = Database(Settings(database_url=url))
    part_a, part_b = partition_name(DAY_A), partition_name(DAY_B)
    try:
        # AS_OF's own day too, as the previous day's run made it (each run makes the day
        # after its own: a run as it goes daily makes one day ahead, not two)
        PostgresIngressLog(db).ensure_partitions({DAY_A, DAY_B, AS_OF.date()})
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT setseed(0.5)")
            # the keys as ingest stores them, received on the day their events occurred
            # (the trigger would date them by this machine's clock, not 2030)
            conn.execute("SET loyalty.keys_recorded = 'on'")
            fill_day(conn, DAY_A, n, "ra")
            fill_day(conn, DAY_B, n, "rb")
            conn.execute("RESET loyalty.keys_recorded")
            for generation in sorted({key_generation(DAY_A), key_generation(DAY_B)}):
                create_keys_partition(db, generation)
            conn.execute(
                "INSERT INTO ingress_keys (source, event_id, day, fingerprint) SELECT source, "
                "event_id, (occurred_at AT TIME ZONE 'UTC')::date, 0 FROM ingress_events"
            )
            conn.execute(
                "INSERT INTO pipeline_checkpoints (shard, txid, seq) "
                "SELECT shard, max(txid), max(seq) FROM ingress_events GROUP BY shard "
                "ON CONFLICT (shard) DO UPDATE SET txid = excluded.txid, seq = excluded.seq"
            )
            conn.execute(
                f"CREATE TABLE {NAIVE} (LIKE ingress_events INCLUDING DEFAULTS INCLUDING INDEXES)"
            )
            conn.execute(f"CREATE UNIQUE INDEX {NAIVE}_dedup ON {NAIVE} (source, event_id)")
            conn.execute(f"CREATE INDEX {NAIVE}_occurred ON {NAIVE} (occurred_at)")
            for part in (part_a, part_b):
                conn.execute(f"INSERT INTO {NAIVE} SELECT * FROM {part} ORDER BY seq")
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")
            size_a = _size(conn, f"SELECT pg_total_relation_size('{part_a}')")
            naive_before = _size(conn, f"SELECT pg_total_relation_size('{NAIVE}')")
            db_before = _size(conn, "SELECT pg_database_size(current_database())")
            b_start = day_start(DAY_B).isoformat()

            # -- ours ------------------------------------------------------------------
            live_ours = [
                "INSERT INTO ingress_events (shard, source, event_id, user_id, type, "
                f"occurred_at, attributes) VALUES (0, 'probe', 'p{{i}}', 'u', 'logged_on', "
                f"'{b_start}'::timestamptz + interval '1 hour', '{{}}')",
                # the pipeline's read pattern: every partition, by (shard, txid, seq)
                "SELECT txid, seq FROM ingress_events WHERE shard = 0 AND (txid, seq) > (0, 0) "
                "ORDER BY txid, seq LIMIT 1",
            ]
            store = create_retention_store(db)
            steps = TimedStore(store)
            retention = Retention(store, retention_days=db.settings.retention_days)
            live = live_oids(conn, ["ingress_events"]) - live_oids(conn, [part_a])
            with LockWatch(url, live_ours, live) as ours_watch:
                t0 = time.perf_counter()
                report = retention.run(AS_OF)  # what `loyalty retention run --as-of` runs
                ours_s = time.perf_counter() - t0
            db_after = _size(conn, "SELECT pg_database_size(current_database())")
            dropped = [d for d in report.dropped if d.day == DAY_A]
            if not dropped or dropped[0].rows != n:
                raise RuntimeError(f"retention did not drop day A: {report.summary()}")
            if to_regclass(conn, part_b) is None:
                raise RuntimeError("retention dropped day B")

            # -- baseline: DELETE + VACUUM on the naive copy -----------------------------
            conn.execute("CHECKPOINT")
            live_naive = [
                f"INSERT INTO {NAIVE} (shard, source, event_id, user_id, type, occurred_at, "
                f"attributes) VALUES (0, 'probe', 'p{{i}}', 'u', 'logged_on', "
                f"'{b_start}'::timestamptz + interval '1 hour', '{{}}')",
                f"SELECT txid, seq FROM {NAIVE} WHERE shard = 0 AND (txid, seq) > (0, 0) "
                "ORDER BY txid, seq LIMIT 1",
            ]
            naive_live = live_oids(conn, [NAIVE])
            with LockWatch(url, live_naive, naive_live) as base_watch:
                t0 = time.perf_counter()
                deleted = conn.execute(
                    f"DELETE FROM {NAIVE} WHERE occurred_at < %s", (day_start(DAY_B),)
                ).rowcount
                delete_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                conn.execute(f"VACUUM {NAIVE}")
                vacuum_s = time.perf_counter() - t1
            naive_after = _size(conn, f"SELECT pg_total_relation_size('{NAIVE}')")
            if deleted != n:
                raise RuntimeError(f"baseline deleted {deleted} rows of {n}")
            with LockWatch(url, live_naive[1:], naive_live) as full_watch:
                t2 = time.perf_counter()
                conn.execute(f"VACUUM FULL {NAIVE}")
                vacuum_full_s = time.perf_counter() - t2
            naive_full = _size(conn, f"SELECT pg_total_relation_size('{NAIVE}')")
    finally:
        db.dispose()
    return {
        "rows": n,
        "partition_bytes": size_a,
        "ours_s": ours_s,
        "ours_returned": db_before - db_after,
        "ours_reported": report.bytes_reclaimed,
        "ours_exclusive": sorted(ours_watch.exclusive),
        "ours_exclusive_live": sorted(ours_watch.on_live),
        "ours_steps": steps.spent,
        "ours_slow_probes": [
            {
                "statement": ("insert", "select")[k],
                "ms": round(ms, 1),
                "during": [n for n, a, b in steps.spans if a <= at <= b],
            }
            for at, k, ms in ours_watch.slow
        ],
        "ours_probe_max_ms": ours_watch.probe_max_ms,
        "ours_probe_errors": ours_watch.errors[:2],
        "delete_s": delete_s,
        "vacuum_s": vacuum_s,
        "naive_before": naive_before,
        "naive_returned": naive_before - naive_after,
        "base_exclusive": sorted(base_watch.exclusive),
        "base_exclusive_live": sorted(base_watch.on_live),
        "base_probe_max_ms": base_watch.probe_max_ms,
        "vacuum_full_s": vacuum_full_s,
        "vacuum_full_returned": naive_after - naive_full,
        "vacuum_full_exclusive_live": sorted(full_watch.on_live),
        "vacuum_full_probe_max_ms": full_watch.probe_max_ms,
    }


def to_regclass(conn: psycopg.Connection[Any], name: str) -> Any:
    row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
    return row[0] if row else None


@benchmark("retention", order=60)
def retention(ctx: Context) -> Result:
    """Expire one day of N ingress events: DETACH CONCURRENTLY + DROP vs DELETE + VACUUM."""
    m = ctx.memo("expiry.retention", lambda: measure(ctx))
    n, size_a = m["rows"], max(m["partition_bytes"], 1)
    base_s = m["delete_s"] + m["vacuum_s"]
    return {
        "value": n / m["ours_s"],
        "unit": "rows expired/s",
        "baseline": "delete_vacuum",
        "baseline_value": n / base_s,
        "rows": n,
        "ours_s": m["ours_s"],
        "baseline_s": base_s,
        "delete_s": m["delete_s"],
        "vacuum_s": m["vacuum_s"],
        "day_bytes": m["partition_bytes"],
        "bytes_back_pct": 100.0 * m["ours_returned"] / size_a,
        "baseline_bytes_back_pct": 100.0 * m["naive_returned"] / size_a,
        "ours_reported_bytes": m["ours_reported"],
        "exclusive_lock_on_live": bool(m["ours_exclusive_live"]),
        "ours_access_exclusive_on": [r for r in m["ours_exclusive"] if not r.isdigit()],
        "ours_steps_s": {k: round(v, 4) for k, v in m["ours_steps"].items()},
        "ours_slow_live_probes": m["ours_slow_probes"],
        "live_probe_max_ms": m["ours_probe_max_ms"],
        "baseline_exclusive_lock_on_live": bool(m["base_exclusive_live"]),
        "baseline_live_probe_max_ms": m["base_probe_max_ms"],
        "vacuum_full_s": m["vacuum_full_s"],
        "vacuum_full_bytes_back_pct": 100.0 * m["vacuum_full_returned"] / size_a,
        "vacuum_full_exclusive_lock_on_live": bool(m["vacuum_full_exclusive_live"]),
        "vacuum_full_live_probe_max_ms": m["vacuum_full_probe_max_ms"],
        "target": "ratio >= 10 and bytes_back_pct >= 90 and not exclusive_lock_on_live",
    }
