"""``loyalty serve`` runs the pipeline worker as a supervised child process: it awards,
its metrics show in serve's /metrics, it comes back after kill -9, and it never
outlives serve (SIGTERM or kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.e2e.live import LOYALTY, create_key, env_for, free_port, wait_healthy
from tests.e2e.test_metrics import metric


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Served:
    def __init__(self, url: str) -> None:
        self.url = url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [*LOYALTY, "serve", "--port", str(self.port)],
            env=env_for(url, LOYALTY_AWARD_WINDOW_SECONDS="0.2"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def worker_pid(self) -> int:
        wait_for(lambda: len(children_of(self.proc.pid)) == 1, what="one worker child")
        return children_of(self.proc.pid)[0]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(f"sqlite:///{tmp_path / 'serve.db'}")
    try:
        wait_healthy(s.proc, s.base, s.output)
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.terminate()
            try:
                s.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                s.proc.kill()
        s.log.close()


def ingest_and_await_award(s: Served, key: str, shop: str, user: str) -> None:
    now = datetime.now(UTC).isoformat()
    batch = {
        "events": [{"event_id": user, "user_id": user, "type": "logged_on", "occurred_at": now}]
    }
    resp = httpx.post(
        s.base + "/v1/ingress/batches", json=batch, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status_code == 202, resp.text

    def awarded() -> bool:
        got = httpx.get(s.base + f"/v1/members/{user}", headers={"Authorization": f"Bearer {shop}"})
        return got.status_code == 200 and got.json()["currency"] > 0

    wait_for(awarded, what=f"an award for {user}")


def test_the_worker_child_awards_and_reports_through_serves_metrics(served: Served) -> None:
    key = create_key(served.url, "ingest", "games")
    shop = create_key(served.url, "shop", "web")
    ingest_and_await_award(served, key, shop, "wp-1")
    assert served.worker_pid() != served.proc.pid

    def scraped() -> str:
        return httpx.get(served.base + "/metrics").text

    wait_for(
        lambda: metric(scraped(), "loyalty_pipeline_events_processed_total") >= 1,
        what="the worker's pipeline counter in serve's /metrics",
    )
    text = scraped()
    assert metric(text, "loyalty_ingest_events_total", source="games", outcome="accepted") == 1
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a family exposed twice"
    assert "loyalty_pipeline_pending_events" in types and "process_cpu_seconds_total" in types


def test_a_killed_worker_child_is_restarted_and_awards_again(served: Served) -> None:
    key = create_key(served.url, "ingest", "games")
    shop = create_key(served.url, "shop", "web")
    first = served.worker_pid()
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: (kids := children_of(served.proc.pid)) != [] and kids != [first],
        what="a new worker child",
    )
    assert served.proc.poll() is None  # serve itself went on
    ingest_and_await_award(served, key, shop, "wp-after-kill")
    assert "exited with -9; restarting" in served.output()


def test_the_worker_child_stops_with_serve(served: Served) -> None:
    child = served.worker_pid()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=40) == 0
    assert not alive(child)  # serve waited for it: stopped, not orphaned
    assert "is gone; stopping" not in served.output()


def test_the_worker_child_does_not_outlive_a_killed_serve(served: Served) -> None:
    child = served.worker_pid()
    served.proc.kill()
    served.proc.wait()
    wait_for(lambda: not alive(child), timeout=20, what="the orphaned worker to stop")
