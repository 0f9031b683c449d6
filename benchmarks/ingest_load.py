"""The HTTP ingest workload, shared by the ingest, earn and storage benchmarks (which
import this module, never each other): the events (``Workload``), their day partitions,
one run of the load generator against real server processes, the PostgreSQL phases of
``ingest_http`` (raw COPY, naive dedup, HTTP; memoized per run, ``storage`` reads what
they left) and the event-store phase, and CPU notes. See :mod:`benchmarks.ingest` for
what each phase is."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from benchmarks import data, loadgen, naive_store, servers
from benchmarks.framework import Context
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import (
    KEYS_DAYS,
    PostgresIngressLog,
    create_keys_partition,
    key_generation,
)
from loyalty.adapters.migrate import migrate
from loyalty.application.access import Role
from loyalty.config import Settings

SOURCE = "bench"
BATCH = 1_000
CLIENTS = 8
SEED = 20_261_126
# jsonb's binary form is a version byte and the JSON text: sent as bytea (a str with
# "jsonb" would be dumped as a JSON *string*).
COPY_TYPES = ["int2", "text", "text", "text", "text", "timestamptz", "bytea"]
COLUMNS = "(shard, source, event_id, user_id, type, occurred_at, attributes)"
SERVER = os.environ.get("LOYALTY_BENCH_SERVER", "uvicorn")


@dataclass(frozen=True)
class Workload:
    n_events: int
    now: datetime
    prefix: str
    seed: int = SEED

    def events(self) -> list[data.Event]:
        return data.make_events(self.n_events, seed=self.seed, now=self.now, prefix=self.prefix)


def ensure_partitions(url: str, wl: Workload) -> None:
    """The day partitions the workload needs (the service creates them on first use)."""
    db = Database(Settings(database_url=url, db_pool_size=1))
    try:
        days = {datetime.fromisoformat(e["occurred_at"]).date() for e in wl.events()}
        PostgresIngressLog(db).ensure_partitions(days)
    finally:
        db.dispose()


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def wl_time_limit(wl: Workload) -> float:
    """Every loop is bounded in time as well as in count."""
    return 60.0 + wl.n_events / 2_000


# -- HTTP ------------------------------------------------------------------------------
def run_http(
    ctx: Context,
    url: str,
    wl: Workload,
    key: str,
    *,
    kind: str = SERVER,
    processes: int = 2,
    watch_pg: bool = True,
) -> dict[str, Any]:
    with servers.serve(url, kind=kind, processes=processes) as running:
        spec = loadgen.LoadSpec(
            ports=running.ports,
            key=key,
            clients=CLIENTS,
            n_events=wl.n_events,
            batch_size=BATCH,
            seed=wl.seed,
            now=wl.now,
            prefix=wl.prefix,
            time_limit=wl_time_limit(wl),
            watch={"server": running.pids},
            pg_admin_url=ctx.admin_url if watch_pg else None,
            pg_dbname=dbname(url) if watch_pg else None,
        )
        result = loadgen.run_in_process(spec)
    result["rate"] = result["accepted"] / result["elapsed_s"]
    result["server"] = f"{kind} x{processes}"
    return result


def per_core_note(cpu: dict[str, float], elapsed: float, events: int) -> dict[str, Any]:
    """CPU seconds per 1M events by process group, and share of the 2 cores used."""
    cores = os.cpu_count() or 1
    return {
        "cpu_s_per_1M": {k: round(v / events * 1e6, 1) for k, v in cpu.items() if k != "other"},
        "cpu_busy": round(sum(v for k, v in cpu.items() if k != "other") / (elapsed * cores), 2),
        # The share of the cores other work on the machine took meanwhile (noise).
        "cpu_other": round(cpu.get("other", 0.0) / (elapsed * cores), 2),
    }


def workload(ctx: Context) -> Workload:
    """The run's events: sized by mode, generated identically by every process."""
    return ctx.memo(
        "ingest.workload",
        lambda: Workload(
            n_events=ctx.pick(smoke=2_000, quick=100_000, full=1_000_000),
            now=datetime.now(UTC),
            prefix="ev",
        ),
    )


def reset_ingress(url: str, window_keys: int = 0) -> None:
    """Empty the ingress log; then, with ``window_keys``, store that many keys of earlier
    batches as a live system holds them (the keys of the retention window): half in the
    previous generation of keys, which every ingested key is probed against, half in
    the current one."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ingress_events")
        conn.execute("TRUNCATE ingress_keys")  # the dedup keys (migrations 0006, 0022)
        if window_keys:
            row = conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date").fetchone()
            assert row is not None
            current = key_generation(row[0])
            previous = current - timedelta(days=KEYS_DAYS)
            db = Database(Settings(database_url=url))
            try:
                create_keys_partition(db, previous)
                create_keys_partition(db, current)
            finally:
                db.dispose()
            for day, n in (
                (previous + timedelta(days=KEYS_DAYS - 1), window_keys // 2),
                (current, window_keys - window_keys // 2),
            ):
                conn.execute(
                    "INSERT INTO ingress_keys (source, event_id, day, fingerprint) "
                    "SELECT %s, md5(%s || g::text), %s, 0 FROM generate_series(1, %s) g",
                    (SOURCE, str(day), day, n),
                )
            conn.execute("VACUUM ANALYZE ingress_keys")
        conn.execute("CHECKPOINT")


# -- worker processes (baselines and the event store) ----------------------------------
def _worker(
    kind: str, url: str, wl: Workload, index: int, workers: int, ready: Any, start: Any, out: Any
) -> None:
    try:
        mine = data.batches(wl.events(), BATCH)[index::workers]
        if kind == "event_store":
            app = naive_store.open_app(url, create_table=False)
            started = _wait(ready, start)
            for batch in mine:
                app.save(
                    *[
                        naive_store.Activity(
                            source=SOURCE,
                            event_id=e["event_id"],
                            user_id=e["user_id"],
                            type=e["type"],
                            occurred_at=datetime.fromisoformat(e["occurred_at"]),
                            attributes=e["attributes"],
                        )
                        for e in batch
                    ]
                )
                if time.perf_counter() - started > wl_time_limit(wl):
                    break
            app.close()
        else:
            rows = [
                [(*r[:6], b"\x01" + r[6].encode()) for r in data.rows_of(b, SOURCE)] for b in mine
            ]
            with psycopg.connect(url) as conn:
                if kind == "naive_dedup":
                    conn.execute(
                        "CREATE TEMP TABLE ingress_staging "
                        "(LIKE ingress_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                    )
                    conn.commit()
                table = "ingress_staging" if kind == "naive_dedup" else "ingress_events"
                started = _wait(ready, start)
                for batch_rows in rows:
                    with conn.cursor() as cur:
                        with cur.copy(f"COPY {table} {COLUMNS} FROM STDIN (FORMAT BINARY)") as cp:
                            cp.set_types(COPY_TYPES)
                            for row in batch_rows:
                                cp.write_row(row)
                        if kind == "naive_dedup":
                            cur.execute(
                                f"INSERT INTO ingress_events {COLUMNS} SELECT {COLUMNS[1:-1]} "
                                "FROM ingress_staging ORDER BY seq ON CONFLICT DO NOTHING"
                            )
                    conn.commit()
                    if time.perf_counter() - started > wl_time_limit(wl):
                        break
        out.put(("ok", index, time.perf_counter(), sum(len(b) for b in mine)))
    except BaseException as exc:
        out.put(("error", index, 0.0, repr(exc)))
        raise


def _wait(ready: Any, start: Any) -> float:
    ready.release()
    if not start.wait(timeout=300):
        raise TimeoutError("never started")
    return time.perf_counter()


def run_workers(kind: str, url: str, wl: Workload, workers: int) -> dict[str, Any]:
    """Run ``workers`` processes over the workload; events/s from go to the last one done."""
    mpx = mp.get_context("spawn")
    ready, start, out = mpx.Semaphore(0), mpx.Event(), mpx.Queue()
    procs = [
        mpx.Process(target=_worker, args=(kind, url, wl, i, workers, ready, start, out))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        deadline, waiting = time.monotonic() + 300, len(procs)
        while waiting:
            if ready.acquire(timeout=0.5):
                waiting -= 1
                continue
            if any(p.exitcode is not None for p in procs):
                _, index, _, payload = out.get(timeout=5)
                raise RuntimeError(f"{kind} worker {index} failed while preparing: {payload}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} workers did not get ready")
        t0 = time.perf_counter()
        start.set()
        ends, done = [], 0
        for _ in procs:
            status, index, end, payload = out.get(timeout=wl_time_limit(wl) + 120)
            if status != "ok":
                raise RuntimeError(f"{kind} worker {index} failed: {payload}")
            ends.append(end)
        # Each worker stops at its time limit, so count what is in the table.
        with psycopg.connect(url) as conn:
            table = naive_store.TABLE if kind == "event_store" else "ingress_events"
            done = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
        elapsed = max(ends) - t0
        return {"events": done, "elapsed_s": elapsed, "rate": done / elapsed}
    except BaseException:
        for p in procs:  # the others must not go on (or wait) on their own
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def pg_phases(ctx: Context) -> dict[str, Any]:
    """copy, naive_dedup and http on PostgreSQL (best of two), then storage."""

    def measure() -> dict[str, Any]:
        url, wl = ctx.pg_url, workload(ctx)
        key = ctx.create_key(Role.INGEST, SOURCE)
        workers = int(os.environ.get("LOYALTY_BENCH_COPY_WORKERS", "2"))
        best: dict[str, dict[str, Any]] = {}
        ensure_partitions(url, wl)
        # Interleaved, best of two for the ratio's two sides: other work on the box
        # comes and goes, and a burst of it should not decide the figure.
        order = ctx.pick(
            smoke=("copy", "http", "naive_dedup"),
            quick=("copy", "http", "naive_dedup", "copy", "http"),
            full=("copy", "naive_dedup", "http") * 2,
        )
        # a live system's keys of the retention window, which every phase's COPY into
        # ingress_events (its trigger) checks its keys against
        window = ctx.pick(smoke=1_000, quick=500_000, full=2_000_000)
        for phase in order:
            reset_ingress(url, window)
            if phase == "http":
                got = run_http(ctx, url, wl, key)
            else:
                got = run_workers(phase, url, wl, workers)
            if phase not in best or got["rate"] > best[phase]["rate"]:
                best[phase] = got
        best["storage"] = ingress_storage(url)  # what the last http phase left
        return best

    return ctx.memo("ingest.pg", measure)


def ingress_storage(url: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE ingress_events")
        size, rows = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0), "
            "(SELECT count(*) FROM ingress_events) FROM pg_inherits i "
            "WHERE i.inhparent = 'ingress_events'::regclass"
        ).fetchone()  # type: ignore[misc]
    return {"bytes": int(size), "rows": int(rows)}


def event_store_phase(ctx: Context) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        url = ctx.pg_url
        base = workload(ctx)
        wl = Workload(
            n_events=ctx.pick(smoke=1_000, quick=20_000, full=150_000),
            now=base.now,
            prefix=base.prefix,
        )
        naive_store.open_app(url).close()  # create its tables once, not racing
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {naive_store.TABLE}")
            conn.execute("CHECKPOINT")
        got = run_workers(
            "event_store", url, wl, int(os.environ.get("LOYALTY_BENCH_ES_WORKERS", "4"))
        )
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"VACUUM ANALYZE {naive_store.TABLE}")
            size = conn.execute(
                "SELECT pg_total_relation_size(%s::regclass)", (naive_store.TABLE,)
            ).fetchone()[0]  # type: ignore[index]
        got["storage"] = {"bytes": int(size), "rows": got["events"]}
        return got

    return ctx.memo("ingest.event_store", measure)


def sqlite_database(ctx: Context, name: str) -> str:
    template = ctx.tmp_dir / "template.db"
    if not template.exists():
        db = Database(Settings(database_url=f"sqlite:///{template}"))
        migrate(db)
        with db.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        db.dispose()
    path = ctx.tmp_dir / name
    shutil.copy(template, path)
    return f"sqlite:///{path}"
