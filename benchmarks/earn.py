"""Earning benchmarks: ``pipeline`` (one worker weighing and awarding a backlog) and
``end_to_end_lag`` (commit-to-award time under steady ingest inside ``loyalty serve``).

``pipeline`` runs on a database of its own: N pending ingress events over M members
(``user-00000``...) are generated server-side (``INSERT ... SELECT generate_series``,
50,000 rows per transaction; the mix of data.py: 40% logged_on, 45% played_game, 10%
joined_competition, 5% an unknown type; occurred_at in the last day). Baseline: the same
rows read back per shard with a bare keyset query (the pipeline's columns, order, chunk
and gap-safe predicate; raw psycopg, orjson as the jsonb loader), in the same process.
Then the worker itself: ``build_pipeline(db).drain(range(16))`` in this process. After
it, the projection catches up and retention expires the (processed) ingress, so that
what is left on disk per 1M ingress events can be measured (see ``storage``).

``end_to_end_lag``: a fresh database, ``loyalty serve`` (API + embedded worker, default
settings) and a separate load process sending 1,000-event batches paced at half of
``ingest_http``'s rate of this run (or of a short in-run measurement when it did not
run); with ``--full`` a second stage at a quarter of ``ingest_http``'s rate, once the
backlog has drained. Every ~0.25 s one batch also carries a *probe*: a ``logged_on``
event of a new user. Lag = from the 202 answer to that batch (its commit happened before) until
``GET /v1/members/{probe}`` first answers 200 (the award is saved and readable), polled
every 0.1 s per outstanding probe.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from benchmarks import data, ingest_load, servers
from benchmarks.cpu import CpuMeter
from benchmarks.framework import Context, Result, benchmark
from benchmarks.loadgen import ChildProcess, percentile
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog
from loyalty.adapters.keys import Role
from loyalty.adapters.storage import storage_report
from loyalty.application.ingress import shard_of
from loyalty.application.pipeline import cyclic_gc_paused
from loyalty.config import Settings

SHARDS = 16
CHUNK = 50_000  # LOYALTY_PIPELINE_CHUNK's default: the baseline reads windows of the same size
FILL_TX = 50_000

_FILL_SQL = """
INSERT INTO ingress_events (shard, source, event_id, user_id, type, occurred_at, attributes)
SELECT (%(shards)s::int2[])[g.u + 1], 'bench', %(prefix)s || g.i,
  'user-' || lpad(g.u::text, 5, '0'),
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
FROM (SELECT i, floor(random() * %(users)s)::int AS u, random() AS r, random() AS r2,
             floor(random() * %(span)s)::bigint AS a
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i) AS g
"""

_READ_SQL = (
    "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, attributes "
    "FROM ingress_events WHERE shard = %s AND (txid, seq) > (%s, %s) "
    "AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint "
    "ORDER BY txid, seq LIMIT %s"
)


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def cpu_note(cpu: dict[str, float], elapsed: float, events: int) -> dict[str, Any]:
    return ingest_load.per_core_note(cpu, elapsed, max(events, 1))


def fill_pending(url: str, n: int, users: int, *, prefix: str = "pe", seed: float = 0.42) -> None:
    """``n`` ingress rows over ``users`` members, in transactions of FILL_TX rows."""
    now = datetime.now(UTC)
    db = Database(Settings(database_url=url, db_pool_size=1))
    try:  # today's and yesterday's partitions exist before the clock starts
        PostgresIngressLog(db).ensure_partitions({now.date(), (now - timedelta(days=1)).date()})
    finally:
        db.dispose()
    shard_map = [shard_of(f"user-{u:05d}", SHARDS) for u in range(users)]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setseed(%s)", (seed,))
        for lo in range(0, n, FILL_TX):
            conn.execute(
                _FILL_SQL,
                {
                    "shards": shard_map,
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


def keyset_read(conn: psycopg.Connection[Any], limit_s: float) -> int:
    """The baseline: every shard's rows in the pipeline's order and window size."""
    rows_read = 0
    started = time.perf_counter()
    for shard in range(SHARDS):
        after = (0, 0)
        while time.perf_counter() - started < limit_s:
            # the same collector pause as the worker's windows: a like-for-like read
            with cyclic_gc_paused(), conn.cursor() as cur:
                set_json_loads(orjson.loads, cur)
                cur.execute(_READ_SQL, (shard, after[0], after[1], CHUNK))
                rows = cur.fetchall()
            rows_read += len(rows)
            if len(rows) < CHUNK:
                break
            after = (rows[-1][0], rows[-1][1])
    return rows_read


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


def pipeline_db(ctx: Context) -> dict[str, Any]:
    """The pipeline's database, filled, read by the baseline, drained by the worker."""

    def measure() -> dict[str, Any]:
        from loyalty.worker import build_pipeline

        n = ctx.pick(quick=200_000, full=1_000_000)
        users = ctx.pick(quick=2_000, full=10_000)
        url = ctx.new_pg_database("pipeline")
        t0 = time.perf_counter()
        fill_pending(url, n, users)
        fill_s = time.perf_counter() - t0
        limit = 60.0 + n / 5_000  # every loop bounded in time too
        with psycopg.connect(url, autocommit=True) as conn:
            keyset_read(conn, limit)  # warm the caches: both sides then read from memory
            rows, base_s, base_cpu, _ = _timed(lambda: keyset_read(conn, limit), ctx.admin_url, url)
        if rows != n:
            raise RuntimeError(f"baseline read {rows} rows of {n}")
        db = Database(Settings(database_url=url))
        stop = threading.Event()
        timer = threading.Timer(limit, stop.set)
        timer.start()
        profile_to = os.environ.get("LOYALTY_BENCH_PROFILE_PIPELINE")
        try:
            pipeline = build_pipeline(db)
            if profile_to:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.002)
                profiler.start()
            done, elapsed, cpu, waits = _timed(
                lambda: pipeline.drain(range(SHARDS), stop), ctx.admin_url, url
            )
            if profile_to:
                profiler.stop()
                Path(profile_to).write_text(profiler.output_text(unicode=False, color=False))
        finally:
            timer.cancel()
        with psycopg.connect(url, autocommit=True) as conn:
            account_events = conn.execute("SELECT count(*) FROM members_events").fetchone()[0]  # type: ignore[index]
            processed, awards = conn.execute(
                "SELECT sum(processed_total), sum(awards_total) FROM pipeline_checkpoints"
            ).fetchone()  # type: ignore[misc]
        result = {
            "url": url,
            "db": db,
            "events": n,
            "users": users,
            "fill_s": fill_s,
            "baseline_rate": rows / base_s,
            "baseline_cpu": base_cpu,
            "baseline_s": base_s,
            "done": done,
            "elapsed_s": elapsed,
            "rate": done / elapsed,
            "cpu": cpu,
            "pg_waits": waits,
            "account_events": int(account_events),
            "processed": int(processed or 0),
            "awards": int(awards or 0),
            "timed_out": stop.is_set(),
        }
        result["storage"] = processed_storage(ctx, db, n)
        return result

    return ctx.memo("earn.pipeline", measure)


def processed_storage(ctx: Context, db: Database, n: int) -> dict[str, Any]:
    """What is left on disk after processing (projection caught up) and retention (the
    ingress days expired): bytes per kind of store."""
    from loyalty.worker import build_projection, build_retention

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
    as_of = datetime.now(UTC) + timedelta(days=db.settings.retention_days + 2)
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
        "after_bytes": after.total_bytes,
        "after_database_bytes": after.database_bytes,
    }


@benchmark("pipeline", order=20)
def pipeline(ctx: Context) -> Result:
    """One worker weighing and awarding N pending events over M members vs a keyset read."""
    m = pipeline_db(ctx)
    return {
        "value": m["rate"],
        "unit": "events/s",
        "baseline": "keyset_read",
        "baseline_value": m["baseline_rate"],
        "events": m["done"],
        "members": m["users"],
        "account_events": m["account_events"],
        "account_events_per_ingress": m["account_events"] / max(m["done"], 1),
        "awards": m["awards"],
        "processed": m["processed"],
        "elapsed_s": m["elapsed_s"],
        "baseline_s": m["baseline_s"],
        "timed_out": m["timed_out"],
        "how": "in-process build_pipeline(db).drain(range(16)), chunk 50000, fresh accounts",
        **cpu_note(m["cpu"], m["elapsed_s"], m["done"]),
        "baseline_cpu_s_per_1M": {
            k: round(v / m["events"] * 1e6, 1) for k, v in m["baseline_cpu"].items() if k != "other"
        },
        "pg_waits": m["pg_waits"],
        "target": "ratio >= 0.5 and value >= 100000 and processed == events",
    }


# -- end_to_end_lag ------------------------------------------------------------------------
@dataclass(frozen=True)
class LagSpec:
    port: int
    ingest_key: str
    shop_key: str
    rate: float  # events/s
    duration: float
    batch: int
    senders: int
    probe_every_s: float
    seed: int
    now: datetime
    prefix: str
    drain_limit: float
    serve_pid: int
    pg_admin_url: str
    pg_dbname: str


def _lag_load(spec: LagSpec) -> dict[str, Any]:
    batches_per_s = spec.rate / spec.batch
    n_batches = max(1, int(batches_per_s * spec.duration))
    events = data.make_events(
        n_batches * spec.batch, seed=spec.seed, now=spec.now, prefix=spec.prefix
    )
    every = max(1, round(batches_per_s * spec.probe_every_s))
    stamp = spec.now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    bodies: list[bytes] = []
    probes: dict[int, str] = {}
    for i, chunk in enumerate(data.batches(events, spec.batch)):
        if i % every == 0:
            user = f"probe-{spec.prefix}-{i:06d}"
            probes[i] = user
            chunk = [
                *chunk,
                {
                    "event_id": f"{spec.prefix}-probe-{i}",
                    "user_id": user,
                    "type": "logged_on",
                    "occurred_at": stamp,
                    "attributes": {},
                },
            ]
        bodies.append(data.body_of(chunk, f"{spec.prefix}-lag-{i}"))
    del events
    ingest_headers = {
        "Authorization": f"Bearer {spec.ingest_key}",
        "Content-Type": "application/json",
    }
    shop_headers = {"Authorization": f"Bearer {spec.shop_key}"}
    lock = threading.Lock()
    next_index = [0]
    acked: dict[str, tuple[float, float]] = {}  # probe user -> (sent, acked)
    seen: dict[str, float] = {}
    latencies: list[float] = []
    late: list[float] = []
    totals = {"accepted": 0, "errors": 0, "polls": 0}
    first_error: list[str] = []
    start = time.perf_counter() + 0.5
    stop_polling = threading.Event()

    def sender() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", spec.port, timeout=60)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(bodies):
                break
            due = start + i / batches_per_s
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                late.append(-wait)
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/ingress/batches", bodies[i], ingest_headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    totals["errors"] += 1
                    first_error.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", spec.port, timeout=60)
                continue
            t1 = time.perf_counter()
            with lock:
                latencies.append(t1 - t0)
                if resp.status == 202:
                    totals["accepted"] += orjson.loads(payload)["accepted"]
                    if i in probes:
                        acked[probes[i]] = (t0, t1)
                else:
                    totals["errors"] += 1
                    if len(first_error) < 3:
                        first_error.append(f"{resp.status}: {payload[:200]!r}")
        conn.close()

    def poller() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", spec.port, timeout=60)
        for _ in range(int((spec.duration + spec.drain_limit + 60) / 0.1)):  # bounded
            round_start = time.perf_counter()
            with lock:
                waiting = [u for u in acked if u not in seen]
            for user in waiting:
                try:
                    conn.request("GET", f"/v1/members/{user}", None, shop_headers)
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", spec.port, timeout=60)
                    continue
                totals["polls"] += 1
                if resp.status == 200:
                    with lock:
                        seen[user] = time.perf_counter()
            if stop_polling.is_set() and not waiting:
                break
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - round_start)))
        conn.close()

    meter = CpuMeter({"serve": [spec.serve_pid]}, spec.pg_admin_url, spec.pg_dbname)
    meter.start()
    cpu0 = time.process_time()
    threads = [threading.Thread(target=sender, daemon=True) for _ in range(spec.senders)]
    poll_thread = threading.Thread(target=poller, daemon=True)
    for t in threads:
        t.start()
    poll_thread.start()
    for t in threads:
        t.join(timeout=spec.duration + 120)
    sent_s = time.perf_counter() - start
    own = time.process_time() - cpu0
    cpu = meter.stop(own)
    waits = meter.pg_waits()
    # then wait (bounded) for the last probes to be awarded
    deadline = time.perf_counter() + spec.drain_limit
    while time.perf_counter() < deadline:
        with lock:
            if all(u in seen for u in acked):
                break
        time.sleep(0.1)
    stop_polling.set()
    poll_thread.join(timeout=10)
    lags = sorted(seen[u] - acked[u][1] for u in acked if u in seen)
    lags_sent = sorted(seen[u] - acked[u][0] for u in acked if u in seen)
    return {
        "accepted": totals["accepted"],
        "errors": totals["errors"],
        "first_error": first_error[0] if first_error else None,
        "sent_s": sent_s,
        "achieved_rate": totals["accepted"] / sent_s,
        "ingest_p50_ms": percentile(latencies, 0.5) * 1000,
        "ingest_p99_ms": percentile(latencies, 0.99) * 1000,
        "late_batches": len(late),
        "max_late_s": max(late, default=0.0),
        "probes": len(probes),
        "probes_acked": len(acked),
        "probes_seen": len(seen),
        "lag_p50_s": percentile(lags, 0.5),
        "lag_p99_s": percentile(lags, 0.99),
        "lag_max_s": lags[-1] if lags else None,
        "lag_p99_from_send_s": percentile(lags_sent, 0.99),
        "polls": totals["polls"],
        "cpu_s": {"loadgen": own, **cpu},
        "pg_waits": waits,
    }


def run_lag_load(spec: LagSpec) -> dict[str, Any]:
    limit = spec.duration + spec.drain_limit + 240
    return ChildProcess(_lag_load, spec, limit=limit, what="lag load generator").start().result()


BENCH_METRICS_TOKEN = "bench-metrics"


def loyalty_serve(url: str, port: int) -> tuple[subprocess.Popen[bytes], Any]:
    """``loyalty serve`` (API + embedded worker), default settings, on 127.0.0.1:port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    env["LOYALTY_DATABASE_URL"] = url
    env["LOYALTY_METRICS_TOKEN"] = BENCH_METRICS_TOKEN  # /metrics on the API port
    exe = str(Path(sys.executable).with_name("loyalty"))
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not servers._healthy(port):
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"loyalty serve exited: {log.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("loyalty serve did not answer /healthz")
        time.sleep(0.1)
    return proc, log


def wait_worker_up(port: int, limit_s: float = 60.0) -> None:
    """Until serve's /metrics carries the worker child's families (it is running)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(
                "GET", "/metrics", headers={"Authorization": f"Bearer {BENCH_METRICS_TOKEN}"}
            )
            if b"loyalty_pipeline_pending_events" in conn.getresponse().read():
                return
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError("the worker process of loyalty serve did not come up")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def wait_drained(url: str, limit_s: float) -> float:
    """Wait (bounded) until the pipeline has nothing pending; returns seconds waited."""
    from loyalty.worker import lag_probe

    db = Database(Settings(database_url=url, db_pool_size=1))
    t0 = time.monotonic()
    try:
        probe = lag_probe(db)
        while time.monotonic() - t0 < limit_s and probe()[0] > 0:
            time.sleep(0.5)
    finally:
        db.dispose()
    return time.monotonic() - t0


def lag_rate(ctx: Context, url: str) -> tuple[float, str]:
    """Half of ingest_http's rate of this run, else of a short in-run measurement."""
    done = ctx.results.get("ingest_http")
    if done and isinstance(done.get("value"), int | float):
        return 0.5 * float(done["value"]), "0.5 x ingest_http of this run"
    wl = ingest_load.Workload(
        n_events=ctx.pick(quick=40_000, full=100_000), now=datetime.now(UTC), prefix="rate"
    )
    key = ctx.create_key(Role.INGEST, "bench-rate", database_url=url)
    ingest_load.ensure_partitions(url, wl)
    got = ingest_load.run_http(ctx, url, wl, key, watch_pg=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ingress_events, ingress_keys")  # rows and their dedup keys
    return 0.5 * got["rate"], f"0.5 x a short in-run ingest_http ({got['rate']:.0f}/s)"


@benchmark("end_to_end_lag", order=30)
def end_to_end_lag(ctx: Context) -> Result:
    """p99 commit-to-award lag at half the ingest rate, worker inside `loyalty serve`."""
    url = ctx.new_pg_database("lag")
    rate, rate_from = lag_rate(ctx, url)
    ingest_key = ctx.create_key(Role.INGEST, "bench-lag", database_url=url)
    shop_key = ctx.create_key(Role.SHOP, "bench-lag-shop", database_url=url)
    now = datetime.now(UTC)
    db = Database(Settings(database_url=url, db_pool_size=1))
    try:  # today's and yesterday's partitions exist before the clock starts
        PostgresIngressLog(db).ensure_partitions({now.date(), (now - timedelta(days=1)).date()})
    finally:
        db.dispose()
    port = servers.free_port()
    proc, log = loyalty_serve(url, port)

    def stage(at: float, seconds: float, prefix: str) -> dict[str, Any]:
        return run_lag_load(
            LagSpec(
                port=port,
                ingest_key=ingest_key,
                shop_key=shop_key,
                rate=at,
                duration=seconds,
                batch=1_000,
                senders=4,
                probe_every_s=0.25,
                seed=ingest_load.SEED + len(prefix),
                now=datetime.now(UTC),
                prefix=prefix,
                drain_limit=ctx.pick(quick=30.0, full=60.0),
                serve_pid=proc.pid,
                pg_admin_url=ctx.admin_url,
                pg_dbname=dbname(url),
            )
        )

    lower: dict[str, Any] | None = None
    try:
        wait_worker_up(port)
        got = stage(rate, ctx.pick(quick=15.0, full=60.0), "lag")
        if ctx.mode == "full":  # and at half that rate, once the backlog is gone
            wait_drained(url, limit_s=120.0)
            lower = stage(rate / 2, 30.0, "lagq")
    finally:
        stop_process(proc)
        log.close()
    with psycopg.connect(url, autocommit=True) as conn:
        account_events = conn.execute("SELECT count(*) FROM members_events").fetchone()[0]  # type: ignore[index]
    return {
        "value": got["lag_p99_s"],
        "unit": "s (p99 lag)",
        "baseline": None,
        "baseline_value": None,
        "lag_p50_s": got["lag_p50_s"],
        "lag_max_s": got["lag_max_s"],
        "lag_p99_from_send_s": got["lag_p99_from_send_s"],
        "probes": got["probes"],
        "probes_seen": got["probes_seen"],
        "target_rate": rate,
        "rate_from": rate_from,
        "achieved_rate": got["achieved_rate"],
        "accepted": got["accepted"],
        "errors": got["errors"],
        "ingest_p99_ms": got["ingest_p99_ms"],
        "late_batches": got["late_batches"],
        "account_events_per_ingress": account_events / max(got["accepted"], 1),
        "method": (
            "a probe event (new user, logged_on) in a batch every 0.25 s; lag = from the "
            "batch's 202 to the first 200 of GET /v1/members/{probe}, polled every 0.1 s"
        ),
        "first_error": got["first_error"],
        "at_quarter_rate": None
        if lower is None
        else {
            "target_rate": rate / 2,
            "achieved_rate": lower["achieved_rate"],
            "lag_p50_s": lower["lag_p50_s"],
            "lag_p99_s": lower["lag_p99_s"],
            "lag_max_s": lower["lag_max_s"],
            "probes_seen": f"{lower['probes_seen']}/{lower['probes']}",
            **cpu_note(lower["cpu_s"], lower["sent_s"], lower["accepted"]),
        },
        **cpu_note(got["cpu_s"], got["sent_s"], got["accepted"]),
        "pg_waits": got["pg_waits"],
        "target": "value <= 5 and probes_seen == probes and errors == 0",
    }
