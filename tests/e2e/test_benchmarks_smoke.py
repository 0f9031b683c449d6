"""Every benchmark runs: ``python -m benchmarks.run --smoke`` (tiny sizes, about a minute
on 2 cores, no target judged) in a real process, against this machine's PostgreSQL (and
SQLite files for ``ingest_http_sqlite``; RabbitMQ for ``delivery``'s relay, required
under CI like PostgreSQL). A benchmark that raises fails this test: four broke in wave 2
without anyone noticing, because nothing ran them.

Needs only the ``dev`` extra (``make test``): the smoke run uses uvicorn, never granian
(``LOYALTY_BENCH_SERVER`` is dropped), draws no chart and profiles nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(900)
def test_every_benchmark_runs_at_smoke_size(pg_admin_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    env["LOYALTY_BENCH_PG"] = pg_admin_url
    listed = _run("--list", env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert len(names) >= 18, listed.stdout

    done = _run("--smoke", env=env, timeout=840)

    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["name"]] = result
    failed = {n: r["error"] for n, r in results.items() if "error" in r}
    assert failed == {}, done.stderr[-4000:]
    assert sorted(results) == sorted(names), done.stderr[-4000:]
    assert done.returncode == 0, done.stderr[-4000:]
    assert all("met" not in r for r in results.values())  # no target judged at smoke size
    # issue 31: throughput as processes are added, same-run ratios against one process
    assert results["scale_out_ingest"]["ratios"].keys() == {"x1", "x2"}
    assert results["scale_out_pipeline"]["ratios"].keys() == {"x1", "x2"}
    # issue 31 part 2: the JetStream ingress log beside PostgreSQL and bare JetStream
    if os.environ.get("CI"):
        assert "bare_jetstream_publish_events_s" in results["jetstream_ingest"]
        assert "bare_ordered_consume_events_s" in results["jetstream_pipeline"]
    relay = results["delivery"].get("relay", "")
    if os.environ.get("CI"):
        assert "relay_send_per_s" in results["delivery"], relay
    elif relay.startswith("skipped"):
        pytest.skip(f"every benchmark ran, but delivery's relay part did not: {relay}")
