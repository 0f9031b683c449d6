"""The pipeline as users run it, over a member base, measured once per run and shared
(memoized) by the ``pipeline`` benchmarks, ``member_read``/``spend`` (the members it
awarded) and ``storage`` (what it left on disk).

One fresh PostgreSQL database per member base of M members:

1. *launch*: one event of each of the M members (none has an account): ``drain`` (each
   member's first window records its account at once: Created, Awarded, RankChanged)
   then ``record_due`` at the interval. Reported as new members per second.
2. *stream*: N events of random members of M plus 5% more members never seen (their
   first event creates an account at once, as live traffic does), generated
   server-side (:mod:`benchmarks.fill`).
   - baseline: the same N rows read per shard from each shard's checkpoint with the
     pipeline's keyset query (warm, then timed), in this process;
   - weighing: ``build_pipeline(db).drain(range(16))`` in this process (weigh, pending
     rows, new members' accounts, rank lifts recorded at once);
   - recording: then ``record_due(range(16), now=interval later)``: every member with
     pending earnings gets its one ``Awarded``, as the worker does once the award
     interval has passed. One interval boundary per N events is the worst case of a
     live stream (at the default 3,600 s interval a real boundary comes after far more
     events); the rate with recording charges it all to these N events.
3. (the first base only) the projection catches up and retention expires the ingress
   days: what is left on disk per 1M ingress events (``storage``).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.cpu import CpuMeter
from benchmarks.fill import (
    SHARDS,
    checkpoints,
    dbname,
    fill_pending,
    keyset_read,
    wait_visible,
)
from benchmarks.framework import Context
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import KEYS_DAYS
from loyalty.adapters.storage import storage_report
from loyalty.config import Settings

NEW_SHARE = 0.05  # of the member base: members first seen in the stream


def _timed(
    fn: Any, admin_url: str, url: str
) -> tuple[Any, float, dict[str, float], dict[str, float]]:
    meter = CpuMeter({}, admin_url, dbname(url))
    meter.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    own = time.process_time() - cpu0
    cpu = meter.stop(own)
    return out, elapsed, {"worker": own, **cpu}, meter.pg_waits()


def _count(url: str, sql: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
    return int(row[0] or 0) if row else 0


def _account_events(url: str) -> int:
    return _count(url, "SELECT count(*) FROM members_events")


def _members(url: str) -> int:
    return _count(url, "SELECT count(DISTINCT originator_id) FROM members_events")


def sizes(ctx: Context, base: str) -> tuple[int, int]:
    """(members, stream events) of the ``small`` (4k members) or ``large`` base."""
    if base == "small":
        return (
            ctx.pick(smoke=400, quick=4_000, full=4_000),
            ctx.pick(smoke=4_000, quick=200_000, full=1_000_000),
        )
    return (
        ctx.pick(smoke=2_000, quick=40_000, full=400_000),
        ctx.pick(smoke=4_000, quick=200_000, full=1_000_000),
    )


def pipeline_run(ctx: Context, base: str = "small") -> dict[str, Any]:
    """The measurement over the ``base`` member base (see the module's docstring)."""
    return ctx.memo(f"pipeline.{base}", lambda: _measure(ctx, base))


def _measure(ctx: Context, base: str) -> dict[str, Any]:
    from loyalty.bootstrap import build_pipeline

    users, n = sizes(ctx, base)
    new = max(1, int(users * NEW_SHARE))
    url = ctx.new_pg_database(f"pipeline{base}")
    limit = 120.0 + (n + users) / 2_000  # every loop bounded in time too
    db = Database(Settings(database_url=url))
    stop = threading.Event()
    timer = threading.Timer(limit * 3, stop.set)
    timer.start()
    try:
        pipeline = build_pipeline(db)
        shards = range(SHARDS)
        interval = timedelta(seconds=pipeline.interval_seconds + 1)

        # 1. launch: every member's first event, no account yet
        fill_pending(url, users, users, prefix="launch", each_once=True, name_users=users + new)
        with psycopg.connect(url, autocommit=True) as conn:
            # (untimed) else the launch drain stops short at a row another session's open
            # transaction still hides, and the stream's baseline below reads the rest:
            # "baseline read 4376 rows of 4000" (smoke run beside the suite)
            wait_visible(conn)
        launched, launch_s, _, _ = _timed(
            lambda: (
                pipeline.drain(shards, stop),
                pipeline.record_due(shards, stop, now=datetime.now(UTC) + interval),
            ),
            ctx.admin_url,
            url,
        )
        launch_account_events = _account_events(url)
        launch_members = _members(url)

        # 2. the stream over the base plus new members
        t0 = time.perf_counter()
        fill_pending(url, n, users + new, prefix="stream", seed=0.42)
        fill_s = time.perf_counter() - t0
        start = checkpoints(url)
        with psycopg.connect(url, autocommit=True) as conn:
            wait_visible(conn)  # (untimed) what the pipeline below will see too
            keyset_read(conn, limit, start)  # warm the caches: both sides read from memory
            rows, base_s, base_cpu, _ = _timed(
                lambda: keyset_read(conn, limit, start), ctx.admin_url, url
            )
        if rows != n:
            raise RuntimeError(f"baseline read {rows} rows of {n}")
        profile_to = os.environ.get("LOYALTY_BENCH_PROFILE_PIPELINE")
        if profile_to:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.002)
            profiler.start()
        done, weigh_s, weigh_cpu, waits = _timed(
            lambda: pipeline.drain(shards, stop), ctx.admin_url, url
        )
        weighed_events = _account_events(url)
        recorded, record_s, record_cpu, record_waits = _timed(
            lambda: pipeline.record_due(shards, stop, now=datetime.now(UTC) + interval),
            ctx.admin_url,
            url,
        )
        if profile_to:
            profiler.stop()
            Path(profile_to).write_text(profiler.output_text(unicode=False, color=False))
        account_events = _account_events(url)
        members = _members(url)
        processed, awards = 0, 0
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT sum(processed_total), sum(awards_total) FROM pipeline_checkpoints"
            ).fetchone()
            if row is not None:
                processed, awards = int(row[0] or 0), int(row[1] or 0)
            left = conn.execute("SELECT count(*) FROM pipeline_pending").fetchone()
        result: dict[str, Any] = {
            "url": url,
            "events": n,
            "users": users,
            "new_users": new,
            "fill_s": fill_s,
            "launch_members": launch_members,
            "launch_s": launch_s,
            "launch_account_events": launch_account_events,
            "launched_events": launched[0],
            "baseline_rate": rows / base_s,
            "baseline_cpu": base_cpu,
            "baseline_s": base_s,
            "done": done,
            "weigh_s": weigh_s,
            "record_s": record_s,
            "weigh_rate": done / weigh_s,
            "rate": done / (weigh_s + record_s),
            "recorded": recorded,
            "cpu": {k: weigh_cpu.get(k, 0.0) + record_cpu.get(k, 0.0) for k in weigh_cpu},
            "pg_waits": waits,
            "record_pg_waits": record_waits,
            "stream_account_events": account_events - launch_account_events,
            "weigh_account_events": weighed_events - launch_account_events,
            "members_after": members,
            "new_members": members - launch_members,
            "pending_left": int(left[0]) if left else 0,
            "processed": processed - launched[0],
            "awards": awards,
            "timed_out": stop.is_set(),
        }
        if base == "small":
            result["storage"] = processed_storage(db, processed)
        return result
    finally:
        timer.cancel()
        db.dispose()


def processed_storage(db: Database, n: int) -> dict[str, Any]:
    """What is left on disk after processing (projection caught up) and retention (the
    ingress days expired): bytes per kind of store."""
    from loyalty.bootstrap import build_projection, build_retention

    projection = build_projection(db)
    t0 = time.perf_counter()
    stop = threading.Event()
    timer = threading.Timer(300, stop.set)
    timer.start()
    try:
        projected = projection.catch_up(stop)
    finally:
        timer.cancel()
    projection_s = time.perf_counter() - t0
    before = storage_report(db)
    # past the retention window of every day ingested, and of the dedup keys' generation
    # (up to eight days longer: they go whole, by the day they were received)
    as_of = datetime.now(UTC) + timedelta(days=db.settings.retention_days + KEYS_DAYS + 2)
    report = build_retention(db).run(as_of)
    with psycopg.connect(db.settings.database_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    after = storage_report(db)

    def by_kind(rep: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        for loc in rep.locations:
            out[loc.kind] = out.get(loc.kind, 0) + loc.bytes
        return out

    return {
        "ingress_events": n,
        "projected_events": projected,
        "projection_rate": projected / projection_s if projection_s else None,
        "retention_rows_dropped": report.rows_dropped,
        "retention_kept": len(report.kept),
        "before_retention": by_kind(before),
        "after_retention": by_kind(after),
        "after_retention_tables": {loc.name: loc.bytes for loc in after.locations},
        "after_retention_rows": {loc.name: loc.rows for loc in after.locations},
        "after_bytes": after.total_bytes,
        "after_database_bytes": after.database_bytes,
    }
