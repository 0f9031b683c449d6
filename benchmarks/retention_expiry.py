"""Time to expire one day of ingress: retention (DETACH CONCURRENTLY + DROP) against a
row-by-row ``DELETE`` baseline, in the same run, on a scratch PostgreSQL database; and
SQLite's retention (chunked DELETE + incremental vacuum) on a scratch file.

    .venv/bin/python -m benchmarks.retention_expiry --rows 500000 [--sqlite-rows 200000]

Rows are generated server-side (the ingest path is measured elsewhere) and every shard's
checkpoint is set past them, as if the pipeline had processed them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog, partition_name
from loyalty.adapters.migrate import migrate
from loyalty.bootstrap import build_retention
from loyalty.config import Settings

DAY_A, DAY_B = date(2030, 3, 1), date(2030, 3, 2)
# as of this time, DAY_A lies wholly outside a 7-day window and DAY_B does not
AS_OF = datetime(2030, 3, 9, 1, tzinfo=UTC)


def _fill_pg(url: str, day: date, rows: int, shards: int) -> None:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    step_ms = max(1, 86_400_000 // rows - 1)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ingress_events (shard, source, event_id, user_id, type, occurred_at, "
            "attributes) SELECT i %% %s, 'bench', 'e' || %s || i, 'u' || (i %% 10000), "
            "'played_game', %s + i * %s * interval '1 millisecond', "
            "jsonb_build_object('result', 'win', 'pad', repeat('x', 150)) "
            "FROM generate_series(1, %s) AS i",
            (shards, day.isoformat(), start, step_ms, rows),
        )


def _all_processed(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pipeline_checkpoints (shard, txid, seq) "
            "SELECT shard, max(txid), max(seq) FROM ingress_events GROUP BY shard "
            "ON CONFLICT (shard) DO UPDATE SET txid = excluded.txid, seq = excluded.seq"
        )
        conn.execute("VACUUM ANALYZE ingress_events")


def postgres(admin_url: str, rows: int) -> dict[str, object]:
    name = f"loyalty_bench_retention_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    db = Database(Settings(database_url=url))
    try:
        migrate(db)
        PostgresIngressLog(db).ensure_partitions({DAY_A, DAY_B})
        for day in (DAY_A, DAY_B):
            _fill_pg(url, day, rows, db.settings.shard_count)
        _all_processed(url)
        with psycopg.connect(url, autocommit=True) as conn:

            def size(day: date) -> int:
                row = conn.execute(
                    "SELECT pg_total_relation_size(%s)", (partition_name(day),)
                ).fetchone()
                return int(row[0]) if row else 0

            def db_size() -> int:
                row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
                return int(row[0]) if row else 0

            before_a, before_b, db_before = size(DAY_A), size(DAY_B), db_size()
            started = time.perf_counter()
            report = build_retention(db).run(AS_OF)
            drop_s = time.perf_counter() - started
            db_after_drop = db_size()
            dropped = [d for d in report.dropped if d.day == DAY_A]

            lower = datetime(DAY_B.year, DAY_B.month, DAY_B.day, tzinfo=UTC)
            started = time.perf_counter()
            deleted = conn.execute(
                "DELETE FROM ingress_events WHERE occurred_at >= %s AND occurred_at < %s",
                (lower, lower + timedelta(days=1)),
            ).rowcount
            delete_s = time.perf_counter() - started
            after_delete = size(DAY_B)
            started = time.perf_counter()
            conn.execute(f"VACUUM {partition_name(DAY_B)}")
            vacuum_s = time.perf_counter() - started
            after_vacuum = size(DAY_B)
            started = time.perf_counter()
            conn.execute(f"VACUUM FULL {partition_name(DAY_B)}")  # ACCESS EXCLUSIVE
            vacuum_full_s = time.perf_counter() - started
            after_full = size(DAY_B)
        return {
            "backend": "postgresql",
            "rows_per_day": rows,
            "retention_drop": {
                "rows": dropped[0].rows if dropped else 0,
                "seconds": round(drop_s, 3),
                "bytes_reclaimed": report.bytes_reclaimed,
                "partition_bytes_before": before_a,
                "database_bytes_before": db_before,
                "database_bytes_after": db_after_drop,
            },
            "delete_baseline": {
                "rows": deleted,
                "delete_seconds": round(delete_s, 3),
                "vacuum_seconds": round(vacuum_s, 3),
                "vacuum_full_seconds": round(vacuum_full_s, 3),
                "bytes_before": before_b,
                "bytes_after_delete": after_delete,
                "bytes_after_vacuum": after_vacuum,
                "bytes_after_vacuum_full": after_full,
            },
        }
    finally:
        db.dispose()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite(rows: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        db = Database(Settings(database_url=f"sqlite:///{path}"))
        try:
            migrate(db)
            conn = sqlite3.connect(path)
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO ingress_events (shard, source, event_id, user_id, type, "
                "occurred_at, received_at, attributes) "
                "SELECT i % 16, 'bench', 'e' || i, 'u' || (i % 10000), 'played_game', "
                "strftime('%Y-%m-%dT%H:%M:%S.000000+00:00', ?, '+' || (i % 86400) || ' seconds'), "
                "?, '{\"result\": \"win\", \"pad\": \"' || printf('%.150c', 'x') || '\"}' FROM n",
                (rows, DAY_A.isoformat(), DAY_A.isoformat()),
            )
            conn.execute(
                "INSERT INTO pipeline_checkpoints (shard, txid, seq) "
                "SELECT shard, 0, max(seq) FROM ingress_events GROUP BY shard"
            )
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            before = path.stat().st_size
            started = time.perf_counter()
            report = build_retention(db).run(AS_OF)
            seconds = time.perf_counter() - started
            return {
                "backend": "sqlite",
                "rows": report.rows_dropped,
                "seconds": round(seconds, 3),
                "bytes_reclaimed": report.bytes_reclaimed,
                "file_bytes_before": before,
                "file_bytes_after": path.stat().st_size,
            }
        finally:
            db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=500_000, help="ingress rows per day (PG)")
    parser.add_argument("--sqlite-rows", type=int, default=200_000, help="rows for SQLite")
    parser.add_argument(
        "--pg",
        default=os.environ.get("LOYALTY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    print(json.dumps(postgres(args.pg, args.rows), indent=2))
    if args.sqlite_rows:
        print(json.dumps(sqlite(args.sqlite_rows), indent=2))


if __name__ == "__main__":
    main()
