"""The HTTP ingest workload, shared by the ingest and earn benchmarks (which import this
module, never each other): the events (``Workload``), their day partitions, one run of
the load generator against real server processes, and CPU notes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from benchmarks import data, loadgen, servers
from benchmarks.framework import Context
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog
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
