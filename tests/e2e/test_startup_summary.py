"""#33 item 8: ``loyalty serve`` says where things are (a live server's own output)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.e2e.live import serve_logged, wait_for_output


def test_serve_prints_one_start_up_summary_and_one_shard_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    # retention's first run comes min(interval, 30 s) after the start: 2 s here
    with serve_logged(url, LOYALTY_RETENTION_INTERVAL_SECONDS="2") as (base, output):
        # the worker's first pass (its shards) and retention's first run on the new database
        wait_for_output(output, "worker owns shard")
        text = wait_for_output(output, "retention as of")
        assert f"API and its docs: {base}/docs" in text
        assert f"console:          {base}/console/" in text
        assert "loyalty keys create --role operator --name" in text
        assert f"database:         sqlite {tmp_path / 'fresh.db'}" in text
        assert "access log:       off (LOYALTY_ACCESS_LOG=true turns it on)" in text
        shard_lines = [line for line in text.splitlines() if "worker owns shard" in line]
        assert len(shard_lines) == 1 and shard_lines[0].endswith("worker owns shards 0-15")
        retention = next(line for line in text.splitlines() if "retention as of" in line)
        assert "bytes reclaimed" not in retention and "nothing has expired" in retention
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert "GET /healthz" not in output()  # no access log unless asked for


def test_the_access_log_can_be_turned_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with serve_logged(url, "--no-worker", LOYALTY_ACCESS_LOG="true") as (base, output):
        assert httpx.get(f"{base}/healthz").status_code == 200
        text = wait_for_output(output, "GET /healthz")
        assert "access log:       on" in text
