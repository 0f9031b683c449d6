"""The dashboard: the pipeline, today's figures, storage, webhooks and alerts, its live
part polled by htmx; and the per-process state behind it (ingest rate, cached figures)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from loyalty.adapters.storage import storage_report
from loyalty.api.deps import Container, ContainerDep
from loyalty.application.reporting import FIGURE_LABELS, TODAY_FIGURES, today_report
from loyalty.console.auth import SessionDep
from loyalty.console.rendering import render

router = APIRouter()


class IngestRate:
    """Events accepted per second by this process's ingest route, over the last minute
    (sampled when the dashboard polls; a replica sees its own share)."""

    WINDOW = 60.0

    def __init__(self, total: Callable[[], float]) -> None:
        self._total = total
        self._samples: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def rate(self) -> float | None:
        now, total = time.monotonic(), self._total()
        with self._lock:
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
                self._samples.popleft()
            first_at, first = self._samples[0]
        if now - first_at < 0.5:
            return None
        return max(0.0, (total - first) / (now - first_at))


def accepted_total(container: Container) -> float:
    total = 0.0
    for metric in container.metrics.ingest_events.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("outcome") == "accepted":
                total += sample.value
    return total


class Figures:
    """The dashboard's costly figures (the storage report counts every table), computed
    at most once per ``ttl`` seconds per process however many dashboards poll; the rest
    is live."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self._value: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def get(self, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self._lock:  # one computation at a time; the others wait for its result
            found = self._value
            if found is None or time.monotonic() - found[0] >= self.ttl:
                found = (time.monotonic(), compute())
                self._value = found
            return found[1]


@dataclass
class ConsoleState:
    """Per app: the ingest-rate sampler and the cached figures of the dashboard."""

    rate: IngestRate
    figures: Figures = field(default_factory=Figures)


def slow_figures(container: Container) -> dict[str, Any]:
    return {
        "figures_at": container.clock(),
        "storage": storage_report(container.db),
    }


def dashboard_data(container: Container, state: ConsoleState) -> dict[str, Any]:
    settings = container.settings
    now = container.clock()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    pipeline = container.pipeline.report()
    admin = container.webhooks
    subscriptions = admin.subscriptions() if admin else []
    backlog = admin.backlog() if admin else {}
    dead_letters = admin.dead_letter_count() if admin else 0
    lag = pipeline.oldest_pending_age_s or 0.0
    assert container.rollups is not None
    # today's figures are the report's (one definition, one source, not cached: a few
    # rollup rows): the dashboard shows what GET /v1/reports/daily answers for today
    report = today_report(container.rollups, today.date())
    alerts = []
    if lag > settings.console_alert_lag_seconds:
        alerts.append(
            f"pipeline lag {lag:.0f} s is over {settings.console_alert_lag_seconds:.0f} s"
        )
    if dead_letters >= settings.console_alert_dead_letters:
        alerts.append(f"{dead_letters} webhook dead letters wait for a replay")
    if pipeline.quarantined_events:
        alerts.append(f"{pipeline.quarantined_events} account events quarantined (loyalty doctor)")
    return {
        "now": now,
        "ingest_rate": state.rate.rate(),
        "pipeline": pipeline,
        "lag": lag,
        "today": [(f, FIGURE_LABELS[f], report[f]) for f in TODAY_FIGURES],
        "members": report["members_with_balance"],
        **state.figures.get(lambda: slow_figures(container)),
        "horizon": (today - timedelta(days=settings.retention_days)).date(),
        "retention_days": settings.retention_days,
        "figures_seconds": state.figures.ttl,
        "subscriptions": len(subscriptions),
        "backlog": sum(backlog.values()),
        "dead_letters": dead_letters,
        "alerts": alerts,
    }


@router.get("/")
async def dashboard(request: Request, container: ContainerDep, session: SessionDep) -> Response:
    state = request.app.state.console
    data = await run_in_threadpool(dashboard_data, container, state)
    return render(request, "dashboard.html", session=session, page="dashboard", **data)


@router.get("/dashboard/live")
async def dashboard_live(
    request: Request, container: ContainerDep, session: SessionDep
) -> Response:
    state = request.app.state.console
    data = await run_in_threadpool(dashboard_data, container, state)
    return render(request, "_dashboard_live.html", session=session, **data)
