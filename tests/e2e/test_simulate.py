"""``loyalty simulate`` against a live ``loyalty serve``: counts, repeatability, and the
server's metrics moving with it."""

from __future__ import annotations

import subprocess
import time

import httpx

from loyalty.config import Settings
from tests.e2e.live import LOYALTY, METRICS_HEADERS, create_key, env_for, serve
from tests.e2e.test_metrics import metric


def simulate(url: str, base: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOYALTY, "simulate", "--url", base, "--key", key, *args],
        env=env_for(url),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_simulate_against_a_live_server(settings: Settings) -> None:
    url = settings.database_url
    key = create_key(url, "ingest", "sim")
    args = ("--users", "300", "--events", "2000", "--batch-size", "250", "--seed", "11")
    with serve(url) as base:
        first = simulate(url, base, key, *args)
        assert first.returncode == 0, first.stderr
        summary = first.stdout.strip().splitlines()[-1]
        assert summary.startswith("sent 2000 events in 8 batches"), summary
        assert "accepted 2000, duplicates 0, rejected 0" in summary and "events/s" in summary

        again = simulate(url, base, key, *args, "--rate", "4000")
        assert again.returncode == 0, again.stderr
        assert "accepted 0, duplicates 2000" in again.stdout  # same seed: same event ids

        text = httpx.get(base + "/metrics", headers=METRICS_HEADERS).text
        assert metric(text, "loyalty_ingest_events_total", source="sim", outcome="accepted") == 2000
        assert (
            metric(text, "loyalty_ingest_events_total", source="sim", outcome="duplicate") == 2000
        )
        assert (
            metric(
                text,
                "loyalty_http_requests_total",
                method="POST",
                route="/v1/ingress/batches",
                status="202",
            )
            == 16
        )
        deadline = time.monotonic() + 60  # the embedded worker shares the registry
        while time.monotonic() < deadline:
            text = httpx.get(base + "/metrics", headers=METRICS_HEADERS).text
            if metric(text, "loyalty_pipeline_events_processed_total") == 2000:
                break
            time.sleep(0.3)
        assert metric(text, "loyalty_pipeline_events_processed_total") == 2000
        assert metric(text, "loyalty_pipeline_awards_total") > 0

        refused = simulate(url, base, "lk_bad_key", "--events", "10")
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1].startswith("error: the service refused")
