"""Earning benchmarks: ``pipeline`` and ``pipeline_many_members`` (the pipeline as users
run it: weigh, record at the interval, new members) and ``end_to_end_lag``
(commit-to-award time under steady ingest inside ``loyalty serve``).

``pipeline`` (4k members) and ``pipeline_many_members`` (400k members full, 40k quick):
see :mod:`benchmarks.pipeline_runs` for how they are measured. ``value`` is the rate with
recording, ``weigh_rate`` the weighing alone (``drain``), both against the same rows read
with the pipeline's keyset query in the same run.

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
import sqlite3
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

from benchmarks import data, ingest_load, servers
from benchmarks.cpu import CpuMeter
from benchmarks.fill import CHUNK, SHARDS, dbname
from benchmarks.framework import Context, Result, benchmark
from benchmarks.loadgen import ChildProcess, percentile
from benchmarks.pipeline_runs import pipeline_run
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog, sqlite_timestamp
from loyalty.application.access import Role
from loyalty.config import Settings

_SQLITE_READ = (  # SqliteIngressLog.read_after's query (no upper bound: all of it)
    "SELECT txid, seq, shard, source, event_id, user_id, type, occurred_at, attributes "
    "FROM ingress_events WHERE shard = ? AND (txid, seq) > (?, ?) ORDER BY txid, seq LIMIT ?"
)


def cpu_note(cpu: dict[str, float], elapsed: float, events: int) -> dict[str, Any]:
    return ingest_load.per_core_note(cpu, elapsed, max(events, 1))


def _pipeline_result(ctx: Context, base: str) -> Result:
    m = pipeline_run(ctx, base)
    return {
        "value": m["rate"],
        "unit": "events/s (weigh + record at the interval)",
        "baseline": "keyset_read",
        "baseline_value": m["baseline_rate"],
        "weigh_rate": m["weigh_rate"],
        "weigh_ratio": m["weigh_rate"] / m["baseline_rate"],
        "events": m["done"],
        "members": m["users"],
        "new_members": m["new_members"],
        "members_first_seen_in_stream": m["new_users"],
        "recorded": m["recorded"],
        "pending_left": m["pending_left"],
        "weigh_s": m["weigh_s"],
        "record_s": m["record_s"],
        "baseline_s": m["baseline_s"],
        "account_events": m["stream_account_events"],
        "account_events_per_ingress": m["stream_account_events"] / max(m["done"], 1),
        "account_events_while_weighing": m["weigh_account_events"],
        "launch_new_members_per_s": m["launch_members"] / max(m["launch_s"], 1e-9),
        "launch_account_events_per_member": m["launch_account_events"]
        / max(m["launch_members"], 1),
        "launch_s": m["launch_s"],
        "processed": m["processed"],
        "timed_out": m["timed_out"],
        "how": (
            "in-process build_pipeline(db): drain(range(16)) then record_due at the "
            "interval, over a base of members with accounts plus 5% new members; "
            "chunk 50000"
        ),
        **cpu_note(m["cpu"], m["weigh_s"] + m["record_s"], m["done"]),
        "baseline_cpu_s_per_1M": {
            k: round(v / m["events"] * 1e6, 1) for k, v in m["baseline_cpu"].items() if k != "other"
        },
        "pg_waits": m["pg_waits"],
        "record_pg_waits": m["record_pg_waits"],
        "target": "ratio >= 0.7 and value >= 100000 and processed == events and pending_left == 0",
    }


@benchmark("pipeline", order=20)
def pipeline(ctx: Context) -> Result:
    """The pipeline as users run it (weigh, record at the interval, new members) over 4k
    members vs a keyset read."""
    return _pipeline_result(ctx, "small")


@benchmark("pipeline_sqlite", order=22)
def pipeline_sqlite(ctx: Context) -> Result:
    """The pipeline as users run it on the embedded SQLite default (weigh + record at the
    interval) over 4k members vs a bare read of the same rows."""
    from loyalty.bootstrap import build_pipeline

    n = ctx.pick(smoke=4_000, quick=100_000, full=300_000)
    users = ctx.pick(smoke=400, quick=4_000, full=4_000)
    url = ingest_load.sqlite_database(ctx, "pipeline.db")
    conn = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
    db = Database(Settings(database_url=url))
    stop = threading.Event()
    timer = threading.Timer(300 + n / 200, stop.set)
    timer.start()
    try:
        pipeline = build_pipeline(db)
        later = datetime.now(UTC) + timedelta(seconds=pipeline.interval_seconds + 1)
        # the member base: three events per member on average, weighed and recorded
        _sqlite_fill(conn, users * 3, users, "psa")
        pipeline.drain(range(SHARDS), stop)
        pipeline.record_due(range(SHARDS), stop, now=later)
        start = {
            int(r[0]): (int(r[1]), int(r[2]))
            for r in conn.execute("SELECT shard, txid, seq FROM pipeline_checkpoints")
        }
        base_events = _sqlite_count(conn, "stored_events")
        # the stream
        _sqlite_fill(conn, n, users, "ps")

        def bare_read() -> int:  # the pipeline reader's query, chunk and order; raw sqlite3
            read = 0
            for shard in range(SHARDS):
                after = start.get(shard, (0, 0))
                while True:
                    rows = conn.execute(_SQLITE_READ, (shard, *after, CHUNK)).fetchall()
                    for row in rows:
                        orjson.loads(row[8])
                    read += len(rows)
                    if len(rows) < CHUNK:
                        break
                    after = (rows[-1][0], rows[-1][1])
            return read

        bare_read()  # warm: both sides read from the page cache
        t0 = time.perf_counter()
        rows_read = bare_read()
        base_s = time.perf_counter() - t0
        if rows_read != n:
            raise RuntimeError(f"baseline read {rows_read} rows of {n}")
        t0 = time.perf_counter()
        done = pipeline.drain(range(SHARDS), stop)
        weigh_s = time.perf_counter() - t0
        later = datetime.now(UTC) + timedelta(seconds=pipeline.interval_seconds + 1)
        recorded = pipeline.record_due(range(SHARDS), stop, now=later)
        record_s = time.perf_counter() - t0 - weigh_s
        account_events = _sqlite_count(conn, "stored_events") - base_events
        left = _sqlite_count(conn, "pipeline_pending")
    finally:
        timer.cancel()
        db.dispose()
        conn.close()
    return {
        "value": done / (weigh_s + record_s),
        "unit": "events/s (weigh + record at the interval)",
        "baseline": "sqlite_read",
        "baseline_value": rows_read / base_s,
        "weigh_rate": done / weigh_s,
        "weigh_ratio": (done / weigh_s) / (rows_read / base_s),
        "events": done,
        "members": users,
        "recorded": recorded,
        "pending_left": left,
        "account_events": account_events,
        "weigh_s": weigh_s,
        "record_s": record_s,
        "timed_out": stop.is_set(),
        "how": (
            "in-process build_pipeline(db) on a SQLite file: a base of members (3 events "
            "each on average, weighed and recorded first), then N events over them: "
            "drain(range(16)) then record_due at the interval; baseline: the reader's "
            "query per shard from the checkpoints, raw sqlite3 + orjson"
        ),
    }


def _sqlite_fill(conn: sqlite3.Connection, n: int, users: int, prefix: str) -> None:
    received = sqlite_timestamp(datetime.now(UTC))
    events = data.make_events(
        n, seed=ingest_load.SEED + len(prefix), now=datetime.now(UTC), prefix=prefix, users=users
    )
    for batch in data.batches(events, 10_000):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO ingress_events (shard, source, event_id, user_id, type, "
            "occurred_at, received_at, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (*r[:5], sqlite_timestamp(r[5]), received, r[6])
                for r in data.rows_of(batch, "bench")
            ],
        )
        conn.execute("COMMIT")


def _sqlite_count(conn: sqlite3.Connection, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


@benchmark("pipeline_many_members", order=21)
def pipeline_many_members(ctx: Context) -> Result:
    """The pipeline as users run it over a large member base (400k full, 40k quick) vs a
    keyset read."""
    return _pipeline_result(ctx, "large")


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
    users: int = data.USERS
    zipf: bool = False


def _lag_load(spec: LagSpec) -> dict[str, Any]:
    batches_per_s = spec.rate / spec.batch
    n_batches = max(1, int(batches_per_s * spec.duration))
    events = data.make_events(
        n_batches * spec.batch,
        seed=spec.seed,
        now=spec.now,
        prefix=spec.prefix,
        users=spec.users,
        zipf=spec.zipf,
    )
    members = len({e["user_id"] for e in events})
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
        "members": members,
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
    from loyalty.bootstrap import lag_probe

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
        n_events=ctx.pick(smoke=2_000, quick=40_000, full=100_000),
        now=datetime.now(UTC),
        prefix="rate",
    )
    key = ctx.create_key(Role.INGEST, "bench-rate", database_url=url)
    ingest_load.ensure_partitions(url, wl)
    got = ingest_load.run_http(ctx, url, wl, key, watch_pg=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ingress_events, ingress_keys")  # rows and their dedup keys
    return 0.5 * got["rate"], f"0.5 x a short in-run ingest_http ({got['rate']:.0f}/s)"


class LiveServe:
    """A fresh database with its keys and today's partitions, and ``loyalty serve`` on it
    (API + worker children), for streams of probed batches (``stream``)."""

    def __init__(self, ctx: Context, name: str, url: str | None = None) -> None:
        self.ctx = ctx
        self.url = url or ctx.new_pg_database(name)
        self.ingest_key = ctx.create_key(Role.INGEST, f"bench-{name}", database_url=self.url)
        self.shop_key = ctx.create_key(Role.SHOP, f"bench-{name}-shop", database_url=self.url)
        now = datetime.now(UTC)
        db = Database(Settings(database_url=self.url, db_pool_size=1))
        try:  # today's and yesterday's partitions exist before the clock starts
            days = {now.date(), (now - timedelta(days=1)).date()}
            PostgresIngressLog(db).ensure_partitions(days)
        finally:
            db.dispose()
        self.port = servers.free_port()
        self.proc, self._log = loyalty_serve(self.url, self.port)

    def __enter__(self) -> LiveServe:
        try:
            wait_worker_up(self.port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        stop_process(self.proc)
        self._log.close()

    def stream(
        self, rate: float, seconds: float, prefix: str, drain_limit: float, **kw: Any
    ) -> dict[str, Any]:
        return run_lag_load(
            LagSpec(
                port=self.port,
                ingest_key=self.ingest_key,
                shop_key=self.shop_key,
                rate=rate,
                duration=seconds,
                batch=1_000,
                senders=4,
                probe_every_s=0.25,
                seed=ingest_load.SEED + len(prefix),
                now=datetime.now(UTC),
                prefix=prefix,
                drain_limit=drain_limit,
                serve_pid=self.proc.pid,
                pg_admin_url=self.ctx.admin_url,
                pg_dbname=dbname(self.url),
                **kw,
            )
        )


@benchmark("end_to_end_lag", order=30)
def end_to_end_lag(ctx: Context) -> Result:
    """p99 commit-to-award lag at half the ingest rate, worker inside `loyalty serve`."""
    url = ctx.new_pg_database("lag")
    rate, rate_from = lag_rate(ctx, url)
    if ctx.mode == "smoke":  # it shows the benchmark runs: a small stream is enough
        rate, rate_from = min(rate, 1_000.0), f"{rate_from}, capped at 1,000/s (smoke)"
    lower: dict[str, Any] | None = None
    drain_limit = ctx.pick(smoke=20.0, quick=30.0, full=60.0)
    with LiveServe(ctx, "lag", url) as live:
        got = live.stream(rate, ctx.pick(smoke=1.0, quick=15.0, full=60.0), "lag", drain_limit)
        if ctx.mode == "full":  # and at half that rate, once the backlog is gone
            wait_drained(url, limit_s=120.0)
            lower = live.stream(rate / 2, 30.0, "lagq", drain_limit)
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


@benchmark("launch_day", order=31)
def launch_day(ctx: Context) -> Result:
    """A launch day, live: a stream at a fixed rate over a large base of members that
    mostly have no account yet (Zipf), into ``loyalty serve``; the p99 lag from a batch's
    202 to its probe member's account, and how long the backlog takes to drain after."""
    rate = ctx.pick(smoke=1_000.0, quick=10_000.0, full=25_000.0)
    seconds = ctx.pick(smoke=1.0, quick=15.0, full=60.0)
    users = ctx.pick(smoke=10_000, quick=200_000, full=1_000_000)
    with LiveServe(ctx, "launch") as live:
        url = live.url
        drain_limit = ctx.pick(smoke=20.0, quick=60.0, full=120.0)
        got = live.stream(rate, seconds, "launch", drain_limit, users=users, zipf=True)
        drain_s = wait_drained(url, limit_s=ctx.pick(smoke=30.0, quick=120.0, full=300.0))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT originator_id) FROM members_events"
        ).fetchone()
    account_events, accounts = (int(row[0]), int(row[1])) if row else (0, 0)
    return {
        "value": got["lag_p99_s"],
        "unit": "s (p99 lag)",
        "baseline": None,
        "baseline_value": None,
        "target_rate": rate,
        "stream_s": seconds,
        "achieved_rate": got["achieved_rate"],
        "accepted": got["accepted"],
        "errors": got["errors"],
        "first_error": got["first_error"],
        "member_base": users,
        "members_in_stream": got["members"],
        "accounts": accounts,
        "account_events_per_account": account_events / max(accounts, 1),
        "lag_p50_s": got["lag_p50_s"],
        "lag_max_s": got["lag_max_s"],
        "probes_seen": f"{got['probes_seen']}/{got['probes']}",
        "ingest_p99_ms": got["ingest_p99_ms"],
        "late_batches": got["late_batches"],
        "drain_after_stream_s": drain_s,
        **cpu_note(got["cpu_s"], got["sent_s"], got["accepted"]),
        "pg_waits": got["pg_waits"],
        "method": (
            "events over a Zipf member base (most members new), 1,000 per batch at a "
            "fixed rate into `loyalty serve`; a probe (new user) every 0.25 s, lag as in "
            "end_to_end_lag; drain_after_stream_s: from the last probe seen (or the wait "
            "for them) until the pipeline has nothing pending"
        ),
        "target": "value <= 5 and errors == 0",
    }
