"""``rule_dry_run`` (issue 20): the rule dry run over one retained day of ingress vs. the
pipeline's own throughput on the same events, and what a dry run running beside the
pipeline costs the pipeline.

A database of its own is filled with N ingress events over M members (``fill.fill_pending``:
the mix of data.py, occurred_at in the last 24 hours, so the period is "yesterday and
today"). Baseline: the pipeline itself, ``build_pipeline(db).drain(range(16))``, in this
process. Then the dry run of a candidate rule set (played_game wins x3 instead of x2,
logged_on worth 2) over the same rows (``build_dry_run(db).compare``), in this process.
Ratio = dry-run events/s / pipeline events/s.

Interference: in two rounds, N/8 new events (at least 50,000) are filled and drained by
the pipeline alone, then again while ``loyalty rules dry-run`` loops in a separate process
at full speed (``LOYALTY_DRY_RUN_DUTY=1``), then again at the default duty (0.5: it sleeps
as long as it works). ``pipeline_slowdown_*`` = 1 - (mean rate beside / mean rate alone).
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

from benchmarks.fill import SHARDS, fill_pending
from benchmarks.framework import Context, benchmark
from loyalty.adapters.db import Database
from loyalty.application.commands.rules import parse_rule_set
from loyalty.config import Settings
from loyalty.domain.rules import DEFAULT_RULES_WIRE


def _candidate() -> dict[str, Any]:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rules"][0]["currency"] = 2
    wire["rules"][1]["multipliers"][0]["factor"] = 3
    return wire


def _drain(db: Database) -> tuple[int, float]:
    from loyalty.bootstrap import build_pipeline

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
    from loyalty.bootstrap import build_dry_run

    n = ctx.pick(smoke=4_000, quick=200_000, full=1_000_000)
    users = ctx.pick(smoke=200, quick=2_000, full=10_000)
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
        # interference: the pipeline alone and beside a dry run in another process,
        # in two interleaved rounds (the rates of single lots are noisy)
        lot = max(n // 8, ctx.pick(smoke=500, quick=50_000, full=50_000))
        lead = ctx.pick(smoke=0.5, quick=3.0, full=3.0)
        rules_file = ctx.tmp_dir / "candidate.json"
        rules_file.write_text(json.dumps(_candidate()))
        rates: dict[str, list[float]] = {"alone": [], "1.0": [], "0.5": []}
        for round_ in range(2):
            for mode in ("alone", "1.0", "0.5"):
                fill_pending(url, lot, users, prefix=f"{mode}-{round_}", seed=0.1 + 0.2 * round_)
                if mode == "alone":
                    done_lot, lot_s = _drain(db)
                    rates[mode].append(done_lot / lot_s)
                else:
                    rates[mode].append(_beside(db, url, rules_file, first, end, mode, lead))
    finally:
        db.dispose()
    pipeline_rate = done / pipeline_s
    dry_rate = comparison.events / dry_s
    alone_rate = sum(rates["alone"]) / 2
    full_rate, paced_rate = sum(rates["1.0"]) / 2, sum(rates["0.5"]) / 2
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
        "pipeline_beside_full_speed_rate": full_rate,
        "pipeline_slowdown_full_speed": 1 - full_rate / alone_rate,
        "pipeline_beside_default_duty_rate": paced_rate,
        "pipeline_slowdown_default_duty": 1 - paced_rate / alone_rate,
        "interference_rates": rates,
        "interference_lot": lot,
    }


def _beside(
    db: Database, url: str, rules_file: Any, first: Any, end: Any, duty: str, lead: float
) -> float:
    """The pipeline's rate while ``loyalty rules dry-run`` loops in another process with
    LOYALTY_DRY_RUN_DUTY=``duty`` (started ``lead`` seconds before the pipeline)."""
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
        (end - timedelta(days=1)).isoformat(),  # the CLI's last day is included
    ]
    background = subprocess.Popen(
        ["/bin/sh", "-c", 'while :; do "$@" >/dev/null || exit 1; done', "sh", *args],
        env=env,
        start_new_session=True,
    )
    try:
        time.sleep(lead)  # the dry run is reading before the pipeline starts
        done, seconds = _drain(db)
    finally:
        os.killpg(background.pid, 15)
        background.wait(30)
    return done / seconds
