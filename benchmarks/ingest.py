"""Ingest benchmarks: ``ingest_http`` (and its baselines), ``ingest_naive_dedup``,
``ingest_vs_event_store`` and ``ingest_http_sqlite`` (``storage`` is in
:mod:`benchmarks.storage`; the shared workload in :mod:`benchmarks.ingest_load`).

PostgreSQL phases share this run's database; each timed phase starts from an empty
ingress log (TRUNCATE, partitions kept) after a CHECKPOINT, and every phase writes the
same events (same seed): 1,000-event batches, ~10k users, occurred_at in the last day.

- ``copy``: the physical limit. Two worker processes (one per core; 4 or 8 measured
  no better) COPY pre-built row tuples straight into the partitioned table (binary
  COPY, one transaction per 1,000 rows), no dedup, no HTTP.
- ``naive_dedup``: the same, but COPY into a temp staging table plus
  ``INSERT ... ON CONFLICT DO NOTHING`` per batch.
- ``http``: real server processes (2 uvicorn processes on 2 ports by default; set
  ``LOYALTY_BENCH_SERVER=granian`` for one granian with 2 workers) and a separate load
  generator process with 8 keep-alive clients.
- ``event_store``: the same events, one new aggregate (stream) each, saved through
  an ``eventsourcing`` Application 1,000 per call, from worker processes.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import data
from benchmarks.framework import Context, Result, benchmark
from benchmarks.ingest_load import (
    BATCH,
    SOURCE,
    Workload,
    event_store_phase,
    per_core_note,
    pg_phases,
    run_http,
    sqlite_database,
    wl_time_limit,
    workload,
)
from loyalty.adapters.ingress_log import sqlite_timestamp
from loyalty.application.access import Role


@benchmark("ingest_http", order=10)
def ingest_http(ctx: Context) -> Result:
    """POST /v1/ingress/batches, 1,000-event batches, 8 clients, PostgreSQL, vs raw COPY."""
    m = pg_phases(ctx)
    http, copy = m["http"], m["copy"]
    return {
        "value": http["rate"],
        "unit": "events/s",
        "baseline": "raw_copy",
        "baseline_value": copy["rate"],
        "events": http["accepted"],
        "errors": http["errors"],
        "duplicates": http["duplicates"],
        "p50_ms": http["p50_ms"],
        "p99_ms": http["p99_ms"],
        "server": http["server"],
        **per_core_note(http["cpu_s"], http["elapsed_s"], max(http["accepted"], 1)),
        "pg_waits": http["pg_waits"],
        "target": "ratio >= 0.5 and value >= 60000 and errors == 0",
    }


@benchmark("ingest_naive_dedup", order=11)
def ingest_naive_dedup(ctx: Context) -> Result:
    """Second baseline: COPY to staging + INSERT ... ON CONFLICT, vs raw COPY."""
    m = pg_phases(ctx)
    return {
        "value": m["naive_dedup"]["rate"],
        "unit": "events/s",
        "baseline": "raw_copy",
        "baseline_value": m["copy"]["rate"],
        "ingest_http": m["http"]["rate"],
    }


@benchmark("ingest_vs_event_store", order=12)
def ingest_vs_event_store(ctx: Context) -> Result:
    """The same events, one stream event each, through the eventsourcing library."""
    es = event_store_phase(ctx)
    ours = ctx.result_of("ingest_http")["value"]
    return {
        "value": es["rate"],
        "unit": "events/s",
        "baseline": "ingest_http",
        "baseline_value": ours,
        "events": es["events"],
        "ours_over_event_store": ours / es["rate"],
        "target": "ours_over_event_store >= 20",
    }


# -- SQLite ----------------------------------------------------------------------------
def sqlite_copy_baseline(path: Path, wl: Workload) -> dict[str, Any]:
    """Raw sqlite3 executemany of the same rows, 1,000 per transaction, no dedup."""
    received = sqlite_timestamp(datetime.now(UTC))
    rows = [
        [(*r[:5], sqlite_timestamp(r[5]), received, r[6]) for r in data.rows_of(b, SOURCE)]
        for b in data.batches(wl.events(), BATCH)
    ]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA secure_delete=ON")
    t0 = time.perf_counter()
    for batch in rows:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO ingress_events (shard, source, event_id, user_id, type, occurred_at, "
            "received_at, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            batch,
        )
        conn.execute("COMMIT")
        if time.perf_counter() - t0 > wl_time_limit(wl):
            break
    elapsed = time.perf_counter() - t0
    done = conn.execute("SELECT count(*) FROM ingress_events").fetchone()[0]
    conn.close()
    return {"events": done, "elapsed_s": elapsed, "rate": done / elapsed}


@benchmark("ingest_http_sqlite", order=13)
def ingest_http_sqlite(ctx: Context) -> Result:
    """ingest_http on the embedded SQLite default, vs raw executemany INSERT (no target)."""
    base = workload(ctx)
    wl = Workload(
        n_events=ctx.pick(smoke=2_000, quick=50_000, full=300_000), now=base.now, prefix="sq"
    )
    raw_url = sqlite_database(ctx, "raw.db")
    baseline = sqlite_copy_baseline(Path(raw_url[len("sqlite:///") :]), wl)
    url = sqlite_database(ctx, "http.db")
    key = ctx.create_key(Role.INGEST, SOURCE, database_url=url)
    http = run_http(ctx, url, wl, key, watch_pg=False)
    return {
        "value": http["rate"],
        "unit": "events/s",
        "baseline": "raw_sqlite_insert",
        "baseline_value": baseline["rate"],
        "events": http["accepted"],
        "errors": http["errors"],
        "p50_ms": http["p50_ms"],
        "p99_ms": http["p99_ms"],
        "server": http["server"],
        **per_core_note(http["cpu_s"], http["elapsed_s"], max(http["accepted"], 1)),
    }
