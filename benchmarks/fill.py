"""Pending ingress rows generated server-side, and the bare keyset read of them: shared
by the pipeline, retention, dry-run and reporting benchmarks (which import this module,
never each other).

The mix of data.py: 40% logged_on, 45% played_game, 10% joined_competition, 5% an unknown
type; users ``user-NNNNN`` (zero-padded to at least 5 digits); ``INSERT ... SELECT
generate_series``, ``FILL_TX`` rows per transaction.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog
from loyalty.application.collector import cyclic_gc_paused
from loyalty.application.ingress import shard_of
from loyalty.config import Settings

SHARDS = 16
CHUNK = 50_000  # LOYALTY_PIPELINE_CHUNK's default: the baseline reads windows of the same size
FILL_TX = 50_000

# {user}: which user a row is of (random, or each user in turn); {width}: digits
_FILL_TEMPLATE = """
INSERT INTO ingress_events (shard, source, event_id, user_id, type, occurred_at, attributes)
SELECT (%(shards)s::int2[])[g.u + 1], 'bench', %(prefix)s || g.i,
  'user-' || lpad(g.u::text, {width}, '0'),
  CASE WHEN g.r < 0.40 THEN 'logged_on' WHEN g.r < 0.85 THEN 'played_game'
       WHEN g.r < 0.95 THEN 'joined_competition' ELSE 'made_deposit' END,
  %(base)s - g.a * interval '1 millisecond',
  CASE WHEN g.r < 0.40
       THEN jsonb_build_object('device', (ARRAY['web','ios','android'])[1 + g.i %% 3])
       WHEN g.r < 0.85 THEN jsonb_build_object('game', 'game-' || g.i %% 40,
            'result', CASE WHEN g.r2 < 0.45 THEN 'win' ELSE 'loss' END,
            'stake', (ARRAY[1,2,5,10,20])[1 + g.i %% 5])
       WHEN g.r < 0.95 THEN jsonb_build_object('competition', 'cup-' || g.i %% 50)
       ELSE jsonb_build_object('amount', (ARRAY[10,25,50,100])[1 + g.i %% 4]) END
FROM (SELECT i, {user} AS u, random() AS r, random() AS r2,
             floor(random() * %(span)s)::bigint AS a
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i) AS g
"""
_RANDOM_USER = "floor(random() * %(users)s)::int"
_EACH_USER = "(i %% %(users)s)::int"
FILL_SQL = _FILL_TEMPLATE.format(user=_RANDOM_USER, width=5)
"""Rows of random users of ``%(users)s`` (5-digit names): for fills of one's own."""

_READ_SQL = (
    "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, attributes "
    "FROM ingress_events WHERE shard = %s AND (txid, seq) > (%s, %s) "
    "AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint "
    "ORDER BY txid, seq LIMIT %s"
)


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def width_for(users: int) -> int:
    """Digits of the user names of ``users`` users (at least 5: ``user-00042``)."""
    return max(5, len(str(max(users - 1, 0))))


def user_name(n: int, width: int = 5) -> str:
    return f"user-{n:0{width}d}"


def fill_pending(
    url: str,
    n: int,
    users: int,
    *,
    prefix: str = "pe",
    seed: float = 0.42,
    each_once: bool = False,
    name_users: int | None = None,
) -> None:
    """``n`` ingress rows over ``users`` members, in transactions of FILL_TX rows:
    of random members, or (``each_once``) of member ``i % users`` for row ``i``. User
    names are padded for ``name_users`` (default ``users``) users, so that fills of
    different sizes name the same member alike."""
    now = datetime.now(UTC)
    db = Database(Settings(database_url=url, db_pool_size=1))
    try:  # today's and yesterday's partitions exist before the clock starts
        PostgresIngressLog(db).ensure_partitions({now.date(), (now - timedelta(days=1)).date()})
    finally:
        db.dispose()
    width = width_for(max(users, name_users or 0))
    shards = [shard_of(user_name(u, width), SHARDS) for u in range(users)]
    sql = _FILL_TEMPLATE.format(user=_EACH_USER if each_once else _RANDOM_USER, width=width)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setseed(%s)", (seed,))
        for lo in range(0, n, FILL_TX):
            conn.execute(
                sql,  # type: ignore[arg-type]
                {
                    "shards": shards,
                    "prefix": prefix + "-",
                    "base": now - timedelta(seconds=30),
                    "span": (23 * 3600 + 50 * 60) * 1000,
                    "users": users,
                    "lo": lo,
                    "hi": min(n, lo + FILL_TX) - 1,
                },
            )
        conn.execute("VACUUM ANALYZE ingress_events")
        conn.execute("CHECKPOINT")


def checkpoints(url: str) -> dict[int, tuple[int, int]]:
    """Every shard's committed pipeline position (``(0, 0)`` for a shard never run)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT shard, txid, seq FROM pipeline_checkpoints").fetchall()
    found = {int(r[0]): (int(r[1]), int(r[2])) for r in rows}
    return {s: found.get(s, (0, 0)) for s in range(SHARDS)}


def wait_visible(conn: psycopg.Connection[Any], timeout: float = 60.0) -> None:
    """Until the gap-safe predicate can see every ingress row stored so far: it reads only
    rows of transactions older than every transaction still open anywhere on the server
    (``pg_snapshot_xmin``), so another session's open write (a test beside the smoke run,
    another database on the server) hid the rows just filled: "baseline read 0 rows of
    4000" under xdist."""
    row = conn.execute("SELECT coalesce(max(txid), 0) FROM ingress_events").fetchone()
    last = int(row[0]) if row else 0
    deadline = time.monotonic() + timeout
    while True:
        found = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        horizon = found.fetchone()
        if horizon is not None and int(horizon[0]) > last:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"ingress rows up to txid {last} still invisible after {timeout} s")
        time.sleep(0.01)


def keyset_read(
    conn: psycopg.Connection[Any],
    limit_s: float,
    start: dict[int, tuple[int, int]] | None = None,
) -> int:
    """The baseline: every shard's rows after ``start`` (default: all) in the pipeline's
    order, window size and gap-safe predicate (raw psycopg, orjson as the jsonb loader,
    the worker's collector pause)."""
    rows_read = 0
    started = time.perf_counter()
    for shard in range(SHARDS):
        after = (start or {}).get(shard, (0, 0))
        while time.perf_counter() - started < limit_s:
            with cyclic_gc_paused(), conn.cursor() as cur:
                set_json_loads(orjson.loads, cur)
                cur.execute(_READ_SQL, (shard, after[0], after[1], CHUNK))
                rows = cur.fetchall()
            rows_read += len(rows)
            if len(rows) < CHUNK:
                break
            after = (rows[-1][0], rows[-1][1])
    return rows_read
