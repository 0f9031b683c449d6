"""``rule_dry_run`` (issue 20): the rule dry run over one retained day of ingress vs. the
pipeline's own throughput on the same events, and what a dry run running beside the
pipeline costs the pipeline.

A database of its own is filled with N ingress events over M members (``earn.fill_pending``:
the mix of data.py, occurred_at in the last 24 hours, so the period is "yesterday and
today"). Baseline: the pipeline itself, ``build_pipeline(db).drain(range(16))``, in this
process. Then the dry run of a candidate rule set (played_game wins x3 instead of x2,
logged_on worth 2) over the same rows (``build_dry_run(db).compare``), in this process.
Ratio = dry-run events/s / pipeline events/s.

Interference: N/4 new events are filled four times more; the pipeline drains the first
lot alone, the second while ``loyalty rules dry-run`` loops in a separate process at full
speed (``LOYALTY_DRY_RUN_DUTY=1``), the third at the default duty (0.5: it sleeps as long
as it works), the fourth alone again (the reference is the mean rate of both lots alone).
``pipeline_slowdown_*`` = 1 - (rate beside the dry run / rate alone).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from benchmarks.earn import SHARDS, fill_pending
from benchmarks.framework import Context, benchmark
from loyalty.adapters.db import Database
from loyalty.config import Settings
from loyalty.domain.rules import DEFAULT_RULES_WIRE, parse_rule_set


def _candidate() -> dict[str, Any]:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rules"][0]["currency"] = 2
    wire["rules"][1]["multipliers"][0]["factor"] = 3
    return wire


def _drain(db: Database) -> tuple[int, float]:
    from loyalty.worker import build_pipeline

    pipeline = build_pipeline(db)
    stop = threading.Event()
    timer = threading.Timer(900, stop.set)
    timer.start()
    try:
        t0 = time.perf_counter()
        done = pipeline.drain(range(SHARDS), stop)
        return done, time.perf_counter() - t0
    finally:
        timer.cancel()


@benchmark("rule_dry_run", order=45)
def rule_dry_run(ctx: Context) -> dict[str, Any]:
    from loyalty.worker import build_dry_run

    n = ctx.pick(quick=200_000, full=1_000_000)
    users = ctx.pick(quick=2_000, full=10_000)
    url = ctx.new_pg_database("dryrun")
    fill_pending(url, n, users, prefix="dr")
    db = Database(Settings(database_url=url))
    try:
        done, pipeline_s = _drain(db)
        today = datetime.now(UTC).date()
        first, end = today - timedelta(days=1), today + timedelta(days=1)
        dry = build_dry_run(db, db.settings)
        dry.duty = 1.0  # full speed for the throughput figure
        candidate = parse_rule_set(_candidate(), 0)
        t0 = time.perf_counter()
        comparison = dry.compare(candidate, first, end)
        dry_s = time.perf_counter() - t0
        report = dry.report(comparison)
        # interference: the pipeline alone, then beside a dry run in another process
        lot = max(n // 4, 50_000)
        fill_pending(url, lot, users, prefix="alone", seed=0.11)
        alone, alone_s = _drain(db)
        rules_file = ctx.tmp_dir / "candidate.json"
        rules_file.write_text(json.dumps(_candidate()))
        beside: dict[str, float] = {}
        for duty in ("1.0", "0.5"):
            fill_pending(url, lot, users, prefix=f"beside{duty}", seed=0.12)
            beside[duty] = _beside(db, url, rules_file, first, end, duty)
        fill_pending(url, lot, users, prefix="alone2", seed=0.13)  # alone again: the noise
        alone2, alone2_s = _drain(db)
    finally:
        db.dispose()
    pipeline_rate = done / pipeline_s
    dry_rate = comparison.events / dry_s
    alone_rate = (alone + alone2) / (alone_s + alone2_s)
    return {
        "name": "rule_dry_run",
        "value": dry_rate,
        "unit": "events/s",
        "baseline": "pipeline drain of the same events",
        "baseline_value": pipeline_rate,
        "events": n,
        "dry_run_events": comparison.events,
        "dry_run_s": dry_s,
        "pipeline_s": pipeline_s,
        "members_with_difference": report["members_with_difference"],
        "pipeline_alone_rate": alone_rate,
        "pipeline_alone_rates": [alone / alone_s, alone2 / alone2_s],
        "pipeline_beside_full_speed_rate": beside["1.0"],
        "pipeline_slowdown_full_speed": 1 - beside["1.0"] / alone_rate,
        "pipeline_beside_default_duty_rate": beside["0.5"],
        "pipeline_slowdown_default_duty": 1 - beside["0.5"] / alone_rate,
    }


def _beside(db: Database, url: str, rules_file: Any, first: Any, end: Any, duty: str) -> float:
    """The pipeline's rate while ``loyalty rules dry-run`` loops in another process with
    LOYALTY_DRY_RUN_DUTY=``duty``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    env["LOYALTY_DATABASE_URL"] = url
    env["LOYALTY_DRY_RUN_DUTY"] = duty
    args = [
        sys.executable,
        "-m",
        "loyalty.cli",
        "rules",
        "dry-run",
        str(rules_file),
        "--from",
        first.isoformat(),
        "--to",
        end.isoformat(),
    ]
    background = subprocess.Popen(
        ["/bin/sh", "-c", 'while :; do "$@" >/dev/null || exit 1; done', "sh", *args],
        env=env,
        start_new_session=True,
    )
    try:
        time.sleep(3.0)  # the dry run is reading before the pipeline starts
        done, seconds = _drain(db)
    finally:
        os.killpg(background.pid, 15)
        background.wait(30)
    return done / seconds
