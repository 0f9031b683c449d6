"""``loyalty serve`` runs the workers as two supervised child processes (the pipeline,
the read models): they award and project, their metrics show in serve's /metrics, each
comes back after kill -9, and neither outlives serve (SIGTERM or kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.e2e.live import (
    LOYALTY,
    METRICS_HEADERS,
    METRICS_TOKEN,
    Server,
    create_key,
    env_for,
    serve_process,
    wait_for,
)
from tests.e2e.test_metrics import metric


def children_of(pid: int) -> dict[str, int]:
    """serve's live children by role: ``pipeline`` or ``read-model``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out["read-model" if b"--no-pipeline" in cmdline else "pipeline"] = int(entry.name)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Served:
    """The live ``serve`` of a test and its two worker children."""

    def __init__(self, server: Server) -> None:
        self.url, self.base, self.proc, self.output = (
            server.url,
            server.base,
            server.proc,
            server.output,
        )

    def worker_pids(self) -> dict[str, int]:
        wait_for(lambda: len(children_of(self.proc.pid)) == 2, what="two worker children")
        return children_of(self.proc.pid)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve_process(
        f"sqlite:///{tmp_path / 'serve.db'}",
        stop_timeout=40,
        LOYALTY_AWARD_WINDOW_SECONDS="0.2",
        LOYALTY_METRICS_TOKEN=METRICS_TOKEN,
    ) as server:
        yield Served(server)


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


def test_the_worker_children_award_project_and_report_through_serves_metrics(
    served: Served,
) -> None:
    key = create_key(served.url, "ingest", "games")
    shop = create_key(served.url, "shop", "web")
    ingest_and_await_award(served, key, shop, "wp-1")
    assert set(served.worker_pids()) == {"pipeline", "read-model"}

    def history() -> list[object]:
        got = httpx.get(
            served.base + "/v1/members/wp-1/history", headers={"Authorization": f"Bearer {shop}"}
        )
        return got.json()["entries"] if got.status_code == 200 else []  # type: ignore[no-any-return]

    wait_for(
        lambda: [e for e in history() if e["kind"] == "award"] != [],  # type: ignore[index]
        what="the read-model child to project the award",
    )

    def scraped() -> str:
        return httpx.get(served.base + "/metrics", headers=METRICS_HEADERS).text

    wait_for(
        lambda: (
            metric(scraped(), "loyalty_pipeline_events_processed_total") >= 1
            and metric(scraped(), "loyalty_projection_events_applied_total", projection="members")
            >= 1
        ),
        what="both children's counters in serve's /metrics",
    )
    text = scraped()
    assert metric(text, "loyalty_ingest_events_total", source="games", outcome="accepted") == 1
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a family exposed twice"
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(series) == len(set(series)), "a series exposed twice"
    # each child's background jobs, on the one job runner, labelled with the child
    wait_for(
        lambda: (
            metric(scraped(), "loyalty_job_runs_total", job="pipeline", worker="pipeline") >= 1
            and metric(scraped(), "loyalty_job_runs_total", job="projection", worker="read-model")
            >= 1
        ),
        what="the children's job runs in serve's /metrics",
    )
    text = scraped()
    last = metric(
        text, "loyalty_job_last_success_timestamp_seconds", job="projection", worker="read-model"
    )
    assert last > time.time() - 120
    for family in (
        "loyalty_pipeline_pending_events",
        "loyalty_projection_lag_events",
        "loyalty_retention_kept_unprocessed_partitions",
        "process_cpu_seconds_total",
    ):
        assert family in types, family


@pytest.mark.parametrize("role", ["pipeline", "read-model"])
def test_a_killed_worker_child_is_restarted_and_works_again(served: Served, role: str) -> None:
    key = create_key(served.url, "ingest", "games")
    shop = create_key(served.url, "shop", "web")
    first = served.worker_pids()[role]
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: children_of(served.proc.pid).get(role, first) != first,
        what=f"a new {role} child",
    )
    assert served.proc.poll() is None  # serve itself went on
    user = f"wp-after-kill-{role}"
    ingest_and_await_award(served, key, shop, user)

    def projected() -> bool:
        got = httpx.get(
            served.base + f"/v1/members/{user}/history",
            headers={"Authorization": f"Bearer {shop}"},
        )
        return got.status_code == 200 and any(e["kind"] == "award" for e in got.json()["entries"])

    wait_for(projected, what="the award in the read models")
    assert f"{role} worker process exited with -9; restarting" in served.output()


def test_the_worker_children_stop_with_serve(served: Served) -> None:
    children = served.worker_pids()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=40) == 0
    # serve waited for them: stopped, not orphaned
    assert not [pid for pid in children.values() if alive(pid)]
    assert "is gone; stopping" not in served.output()


def test_the_worker_children_do_not_outlive_a_killed_serve(served: Served) -> None:
    children = served.worker_pids()
    served.proc.kill()
    served.proc.wait()
    wait_for(
        lambda: not [pid for pid in children.values() if alive(pid)],
        timeout=20,
        what="the orphaned workers to stop",
    )


def test_a_worker_with_nothing_to_run_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [*LOYALTY, "worker", "--no-pipeline", "--no-projections"],
        env=env_for(f"sqlite:///{tmp_path / 'x.db'}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "nothing to run" in done.stderr
