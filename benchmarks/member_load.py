"""Cold load of one member with a long account history: with snapshots vs. without.

One member gets ``n`` account events (1,000,000 full, 100,000 quick) written by the real
aggregate and mapper, plus the snapshots the application would have taken (every
``LOYALTY_SNAPSHOT_INTERVAL`` = 100 events), all inserted with binary COPY into a fresh
PostgreSQL database. Then the same stream is loaded cold (an application without an
aggregate cache: every ``get`` reads the store) through the library's repository:

- ``value``: loads/s with snapshots (latest snapshot + the events after it);
- ``baseline``: loads/s of the same application with snapshotting off (the whole stream),
  in the same run.

Also reported: the p50/p99 of the loads with snapshots, the first load of a new
application (its connection included), and the time to write the stream.

    .venv/bin/python -m benchmarks.run --only member_load [--full]
"""

from __future__ import annotations

import statistics
import time
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from benchmarks.framework import Context, benchmark
from loyalty.adapters.event_store import event_store_env
from loyalty.application.accounts import Members
from loyalty.application.pending import award_id_for
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.ranks import Rank, RankLadder

INTERVAL = 100
CHUNK = 50_000
LADDER = RankLadder((Rank("base", 0, ()),))


def _copy(conn: psycopg.Connection[Any], table: str, rows: list[tuple[Any, ...]]) -> None:
    statement = sql.SQL(
        "COPY {} (originator_id, originator_version, topic, state) FROM STDIN (FORMAT BINARY)"
    ).format(sql.Identifier(table))
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(["uuid", "int8", "text", "bytea"])
        for row in rows:
            copy.write_row(row)


def write_stream(app: Members, url: str, user_id: str, events: int) -> tuple[UUID, int]:
    """Write ``events`` account events of one member (pipeline awards of one shard, as
    the worker records them) and its snapshots every INTERVAL events; returns the member
    id and the number of snapshots."""
    assert app.snapshots is not None
    events_table = app.recorder.events_table_name  # type: ignore[attr-defined]
    snapshots_table = app.snapshots.recorder.events_table_name  # type: ignore[attr-defined]
    mapper = app.mapper
    member = Member(user_id=user_id)
    stored: list[tuple[Any, ...]] = []
    snapshots: list[tuple[Any, ...]] = []
    taken = 0
    # the account opens with its first award: collected at once, as Members saves it,
    # so the three opening events are one Enrolled before any snapshot is numbered
    member.award(award_id_for(3, (10_000_000, 0)), 1, 1, 1, 1, LADDER)
    for e in member.collect_events():
        s = mapper.to_stored_event(e)
        stored.append((s.originator_id, s.originator_version, s.topic, s.state))
    written = 0
    i = 1
    with psycopg.connect(url, autocommit=True) as conn:
        while member.version < events:
            before = member.version
            member.award(award_id_for(3, (10_000_000 + i // 50, i % 50)), 1, 1, 1, 1, LADDER)
            i += 1
            if member.version // INTERVAL > before // INTERVAL:  # as Members does on save
                snap = mapper.to_stored_event(Member.Snapshot.take(member))
                snapshots.append(
                    (snap.originator_id, snap.originator_version, snap.topic, snap.state)
                )
            if member.version - written >= CHUNK or member.version >= events:
                written = member.version
                for e in member.collect_events():
                    s = mapper.to_stored_event(e)
                    stored.append((s.originator_id, s.originator_version, s.topic, s.state))
                _copy(conn, events_table, stored)
                _copy(conn, snapshots_table, snapshots)
                taken += len(snapshots)
                stored, snapshots = [], []
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(events_table)))
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(snapshots_table)))
    return member.id, taken


def _load_ms(app: Members, member_id: UUID, times: int, deadline: float) -> tuple[list[float], Any]:
    samples: list[float] = []
    loaded: Any = None
    for _ in range(times):
        start = time.perf_counter()
        loaded = app.repository.get(member_id)
        samples.append((time.perf_counter() - start) * 1000)
        if time.monotonic() > deadline:
            break
    return samples, loaded


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@benchmark("member_load", order=45)
def member_load(ctx: Context) -> dict[str, object]:
    """Cold load of a member with 1M account events: snapshots vs. none (same run)."""
    n = ctx.pick(smoke=1_000, quick=100_000, full=1_000_000)
    url = ctx.new_pg_database("member_load")
    settings = Settings(database_url=url, snapshot_interval=INTERVAL, db_pool_size=2)
    cold_env = {**event_store_env(settings), "AGGREGATE_CACHE_MAXSIZE": ""}  # no cache
    with_snapshots = Members(env=cold_env)
    without = Members(env={**cold_env, "IS_SNAPSHOTTING_ENABLED": "n"})
    try:
        started = time.monotonic()
        member_id, taken = write_stream(with_snapshots, url, "heavy", n)
        write_s = time.monotonic() - started

        deadline = time.monotonic() + 120
        snap_ms, a = _load_ms(with_snapshots, member_id, 1000, deadline)
        base_ms, b = _load_ms(
            without, member_id, ctx.pick(smoke=2, quick=5, full=3), deadline + 180
        )
        assert a == b and a.version == n and a.currency == n, (
            f"the two loads differ: {a.version}, {a.currency}; {b.version}, {b.currency}"
        )

        first_ms = []
        for _ in range(10):
            fresh = Members(env=cold_env)
            try:
                start = time.perf_counter()
                fresh.repository.get(member_id)
                first_ms.append((time.perf_counter() - start) * 1000)
            finally:
                fresh.close()
    finally:
        with_snapshots.close()
        without.close()
    return {
        "value": 1000 / statistics.mean(snap_ms),
        "unit": "loads/s",
        "baseline": "load without snapshots",
        "baseline_value": 1000 / statistics.mean(base_ms),
        "events": n,
        "snapshot_interval": INTERVAL,
        "snapshots": taken,
        "loads": len(snap_ms),
        "p50_ms": _pct(snap_ms, 0.5),
        "p99_ms": _pct(snap_ms, 0.99),
        "new_app_first_load_p50_ms": statistics.median(first_ms),
        "baseline_loads": len(base_ms),
        "baseline_p50_ms": statistics.median(base_ms),
        "write_s": write_s,
        "target": "p99_ms <= 10",
    }
