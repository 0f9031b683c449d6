"""Throughput as processes are added (issue 31), on one PostgreSQL database.

``scale_out_ingest``: the same events posted by the same load generator (8 keep-alive
clients, spread round-robin over the ports) to 1, 2 and 4 API processes (what ``serve
--no-worker`` runs), each on a fresh database. ``scale_out_pipeline``: the same backlog
(generated server-side, ``benchmarks.fill``) weighed by 1, 2 and 4 ``loyalty worker``
processes with disjoint shards (``all``; ``0-7``/``8-15``; four ranges of 4), filled
before the workers start and timed from the moment they may take their shards (this
process holds every shard's lease until all of them are in their loops) until every row
is processed. Ratios are against 1 process in the
same run; each result also says where the CPU went (our processes, PostgreSQL, the rest
of the machine) over the same wall-clock time, to show what saturates: on a 2-core box
more processes than cores cannot add throughput, and other work on the machine takes
its share ("under load")."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import IO, Any

import psycopg

from benchmarks import fill, loadgen, servers
from benchmarks.cpu import CpuMeter
from benchmarks.framework import Context, benchmark
from loyalty.adapters.db import Database
from loyalty.adapters.keys import Role
from loyalty.adapters.pipeline_store import SHARD_LEASE_NS, PipelineStore
from loyalty.config import Settings

PROCESSES = (1, 2, 4)
CLIENTS = 8
BATCH = 500
RANGES = {1: ["all"], 2: ["0-7", "8-15"], 4: ["0-3", "4-7", "8-11", "12-15"]}


def _cores(cpu: dict[str, float], elapsed: float) -> dict[str, float]:
    """CPU seconds per group over the run as cores busy on average (2 = all of them)."""
    return {k: round(v / elapsed, 2) for k, v in cpu.items()} if elapsed > 0 else {}


def _ratios(rates: dict[int, float]) -> dict[str, float]:
    base = rates[1]
    return {f"x{n}": round(r / base, 2) if base else 0.0 for n, r in rates.items()}


@benchmark("scale_out_ingest", order=95)
def scale_out_ingest(ctx: Context) -> dict[str, Any]:
    """Ingest events/s with 1, 2, 4 API processes (same events, same clients)."""
    n = ctx.pick(smoke=1_000, quick=40_000, full=200_000)
    now = datetime.now(UTC)
    rates: dict[int, float] = {}
    cores: dict[int, dict[str, float]] = {}
    for processes in ctx.pick(smoke=(1, 2), quick=PROCESSES, full=PROCESSES):
        url = ctx.new_pg_database(f"so_api{processes}")
        key = ctx.create_key(Role.INGEST, "bench-ingest", url)
        with servers.serve(url, processes=processes) as running:
            spec = loadgen.LoadSpec(
                ports=running.ports,
                key=key,
                clients=CLIENTS,
                n_events=n,
                batch_size=BATCH,
                seed=31,
                now=now,
                prefix=f"so{processes}",
                time_limit=60.0 + n / 1_000,
                watch={"api": running.pids},
                pg_admin_url=ctx.admin_url,
                pg_dbname=fill.dbname(url),
            )
            result = loadgen.run_in_process(spec)
        if result["errors"] or result["accepted"] != n:
            raise RuntimeError(f"{processes} APIs: {result['first_error']} ({result})")
        rates[processes] = result["accepted"] / result["elapsed_s"]
        cores[processes] = _cores(result["cpu_s"], result["elapsed_s"])
    ratios = _ratios(rates)
    top = max(rates)
    return {
        "name": "scale_out_ingest",
        "value": round(rates[top]),
        "unit": "events/s",
        "baseline": "1 API process",
        "baseline_value": round(rates[1]),
        "events": n,
        "rates": {f"{p} APIs": round(r) for p, r in rates.items()},
        "ratios": ratios,
        "cores_busy": {f"{p} APIs": c for p, c in cores.items()},
    }


class _Worker:
    def __init__(self, url: str, shards: str) -> None:
        self.log: IO[bytes] = tempfile.TemporaryFile()
        env = servers._env(url, {"LOYALTY_DB_APPLICATION_NAME": f"bench-worker-{shards}"})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loyalty.cli",
                "worker",
                "--shards",
                shards,
                "--no-projections",
                "--no-webhooks",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _processed(db: Database) -> int:
    return PipelineStore(db).totals()[0]


def _pipeline_run(
    ctx: Context, workers: int, n: int, users: int
) -> tuple[float, dict[str, float], dict[str, float]]:
    """(events/s, cores busy per group, what PostgreSQL's active backends waited on)."""
    url = ctx.new_pg_database(f"so_wk{workers}")
    fill.fill_pending(url, n, users, prefix=f"so{workers}")
    # every shard's lease held here while the workers start (a cold start takes seconds,
    # more under load), released at once when all are in their loops: the clock starts
    gate = psycopg.connect(url, autocommit=True)
    for shard in range(fill.SHARDS):
        gate.execute("SELECT pg_advisory_lock(%s, %s)", (SHARD_LEASE_NS, shard))
    procs = [_Worker(url, shards) for shards in RANGES[workers]]
    db = Database(Settings(database_url=url, db_pool_size=2))
    try:
        deadline = time.monotonic() + 120
        while not all("worker for shards" in p.output() for p in procs):
            for p in procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {p.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not take their shards in 120 s")
            time.sleep(0.1)
        meter = CpuMeter({"workers": [p.proc.pid for p in procs]}, ctx.admin_url, fill.dbname(url))
        meter.start()
        started = time.monotonic()
        gate.close()
        limit = started + 120 + n / 500
        while _processed(db) < n:
            if time.monotonic() > limit:
                raise RuntimeError(f"{workers} workers: {_processed(db)} of {n} processed")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = meter.stop()
        return n / elapsed, _cores(cpu, elapsed), meter.pg_waits()
    finally:
        gate.close()
        db.dispose()
        for p in procs:
            p.stop()


@benchmark("scale_out_pipeline", order=96)
def scale_out_pipeline(ctx: Context) -> dict[str, Any]:
    """Pipeline events/s with 1, 2, 4 workers (disjoint shards, the same backlog)."""
    n = ctx.pick(smoke=1_000, quick=100_000, full=400_000)
    users = ctx.pick(smoke=100, quick=10_000, full=10_000)
    rates: dict[int, float] = {}
    cores: dict[int, dict[str, float]] = {}
    waits: dict[int, dict[str, float]] = {}
    for workers in ctx.pick(smoke=(1, 2), quick=PROCESSES, full=PROCESSES):
        rates[workers], cores[workers], waits[workers] = _pipeline_run(ctx, workers, n, users)
    top = max(rates)
    return {
        "name": "scale_out_pipeline",
        "value": round(rates[top]),
        "unit": "events/s",
        "baseline": "1 worker",
        "baseline_value": round(rates[1]),
        "events": n,
        "members": users,
        "rates": {f"{w} workers": round(r) for w, r in rates.items()},
        "ratios": _ratios(rates),
        "cores_busy": {f"{w} workers": c for w, c in cores.items()},
        "pg_waits": {f"{w} workers": c for w, c in waits.items()},
    }
