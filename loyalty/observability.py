"""Metrics, structured logs and request ids.

Everything here is built per process by a composition root (``create_app``, the CLI);
nothing is registered at import time. :class:`Metrics` owns a prometheus
``CollectorRegistry`` and implements the small metrics ports that the application
layer declares (``IngestMetrics``, ``PipelineMetrics``, ``SpendingMetrics``,
``ProjectionMetrics``), so use cases never import prometheus.

Never put a user id, an event id, an order id or a key into a label or a log line:
labels are bounded sets (route templates, sources, outcomes, kinds).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

# ---------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WINDOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric of one process, in its own registry (scraped at ``GET /metrics``, or
    for ``loyalty worker --metrics-port`` from prometheus' HTTP server).

    Placeholders for retention and forget-me (defined here, incremented by them):

    - ``retention_partitions_dropped`` (counter, no labels): call
      ``metrics.retention_partitions_dropped.inc(n)`` after dropping ``n`` expired
      ingress partitions.
    - ``retention_kept_unprocessed`` (gauge, no labels): after a retention run,
      ``metrics.retention_kept_unprocessed.set(k)`` with the number of expired
      partitions kept because they still hold events the pipeline has not processed
      (anything above 0 for long means the pipeline is stuck).
    - ``forget_requests`` (counter, label ``status``): ``metrics.forget_requests.labels(
      status="accepted").inc()`` when a request is accepted, and ``status="completed"``
      / ``"failed"`` when it ends. Never label with a user id or request id.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # What GET /metrics exposes: this registry, or one that merges a worker
        # process's families into it (``loyalty.worker_process.merged_registry``).
        self.exposition: CollectorRegistry = self.registry
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        # HTTP
        self.http_requests = Counter(
            "loyalty_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "loyalty_http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # ingress
        self.ingest_events = Counter(
            "loyalty_ingest_events",
            "ingress events by source and outcome (accepted, duplicate, rejected)",
            ["source", "outcome"],
            registry=r,
        )
        self.ingest_batches = Counter(
            "loyalty_ingest_batches", "ingress batches stored, by source", ["source"], registry=r
        )
        self.ingest_conflicts = Counter(
            "loyalty_ingest_conflicts",
            "duplicates (counted in loyalty_ingest_events too) whose event id was seen with "
            "other content: the event was not stored",
            ["source"],
            registry=r,
        )
        self.ingest_unweighed = Counter(
            "loyalty_ingest_unweighed_events",
            "accepted events whose type no rule of the current rule set weighs",
            ["source", "type"],
            registry=r,
        )
        # pipeline
        self.pipeline_events = Counter(
            "loyalty_pipeline_events_processed",
            "ingress events the pipeline has weighed",
            registry=r,
        )
        self.pipeline_awards = Counter(
            "loyalty_pipeline_awards", "awards the pipeline has issued", registry=r
        )
        self.pipeline_windows = Counter(
            "loyalty_pipeline_windows", "shard windows the pipeline has committed", registry=r
        )
        self.pipeline_window_seconds = Histogram(
            "loyalty_pipeline_window_seconds",
            "time to weigh, award and commit one shard window",
            buckets=WINDOW_BUCKETS,
            registry=r,
        )
        self.pipeline_pending = Gauge(
            "loyalty_pipeline_pending_events",
            "ingress events not yet processed (all shards; sampled by each worker)",
            registry=r,
        )
        self.pipeline_oldest_pending_age = Gauge(
            "loyalty_pipeline_oldest_pending_age_seconds",
            "age of the oldest unprocessed ingress event (0 when none is pending)",
            registry=r,
        )
        # accounts
        self.account_commands = Counter(
            "loyalty_account_commands",
            "spend, refund and adjustment commands by outcome (applied, replayed, error code)",
            ["command", "outcome"],
            registry=r,
        )
        self.currency_spent = Counter(
            "loyalty_currency_spent", "currency spent on orders", registry=r
        )
        self.currency_refunded = Counter(
            "loyalty_currency_refunded", "currency refunded to members", registry=r
        )
        # projections
        self.projection_position = Gauge(
            "loyalty_projection_position",
            "notification id a projection has applied up to",
            ["projection"],
            registry=r,
        )
        self.projection_lag = Gauge(
            "loyalty_projection_lag_events",
            "account events not yet applied to a projection's read models",
            ["projection"],
            registry=r,
        )
        self.projection_events = Counter(
            "loyalty_projection_events_applied",
            "account events applied to read models",
            ["projection"],
            registry=r,
        )
        self.projection_quarantine = Counter(
            "loyalty_projection_events_quarantined",
            "account events a projection could not apply and passed over (loyalty doctor)",
            ["projection"],
            registry=r,
        )
        # retention and forget-me (see the class docstring)
        self.retention_partitions_dropped = Counter(
            "loyalty_retention_partitions_dropped",
            "expired ingress partitions dropped",
            registry=r,
        )
        self.currency_expired_lots = Counter(
            "loyalty_currency_expired_lots",
            "currency lots expired by the expiry job (CurrencyExpired events)",
            registry=r,
        )
        self.currency_expired_amount = Counter(
            "loyalty_currency_expired",
            "currency expired by the expiry job",
            registry=r,
        )
        self.retention_kept_unprocessed = Gauge(
            "loyalty_retention_kept_unprocessed_partitions",
            "expired ingress partitions kept because they hold unprocessed events",
            registry=r,
        )
        self.forget_requests = Counter(
            "loyalty_forget_requests", "forget-me requests by status", ["status"], registry=r
        )
        # events out (feed, webhooks, relay)
        self.deliveries = Counter(
            "loyalty_deliveries",
            "webhook delivery attempts and relay publishes by outcome",
            ["outcome"],
            registry=r,
        )
        self.delivery_lag = Gauge(
            "loyalty_delivery_lag_events",
            "account events (notification ids) a way out has not passed yet",
            ["channel"],
            registry=r,
        )
        self.delivery_errors = Counter(
            "loyalty_delivery_errors",
            "exceptions a delivery loop caught (it backed off and carried on), by kind",
            ["channel", "kind"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "loyalty_webhook_dead_letters", "webhook deliveries parked as dead letters", registry=r
        )
        # background jobs (loyalty.application.jobs.JobRunner)
        self.jobs_run = Counter(
            "loyalty_job_runs", "successful runs of a background job", ["job"], registry=r
        )
        self.jobs_failed = Counter(
            "loyalty_job_failures",
            "failed runs of a background job (it backed off and carried on), by kind",
            ["job", "kind"],
            registry=r,
        )
        self.jobs_last_success = Gauge(
            "loyalty_job_last_success_timestamp_seconds",
            "when a background job last ran successfully (unix time)",
            ["job"],
            registry=r,
        )
        self.jobs_failing = Gauge(
            "loyalty_job_failing",
            "1 while a background job fails (from a failure to the next success)",
            ["job"],
            registry=r,
        )

    # -- IngestMetrics
    def ingested(
        self,
        source: str,
        *,
        accepted: int,
        duplicates: int,
        rejected: int,
        conflicts: int = 0,
        unweighed: dict[str, int] | None = None,
    ) -> None:
        events = self.ingest_events
        events.labels(source, "accepted").inc(accepted)
        events.labels(source, "duplicate").inc(duplicates)
        events.labels(source, "rejected").inc(rejected)
        self.ingest_batches.labels(source).inc()
        if conflicts:
            self.ingest_conflicts.labels(source).inc(conflicts)
        if unweighed:
            for event_type, count in unweighed.items():
                self.ingest_unweighed.labels(source, event_type).inc(count)

    # -- PipelineMetrics
    def window_processed(self, *, events: int, awards: int, seconds: float) -> None:
        self.pipeline_events.inc(events)
        self.pipeline_awards.inc(awards)
        self.pipeline_windows.inc()
        self.pipeline_window_seconds.observe(seconds)

    def pipeline_lag(self, *, pending: int, oldest_age_s: float | None) -> None:
        self.pipeline_pending.set(pending)
        self.pipeline_oldest_pending_age.set(oldest_age_s or 0.0)

    # -- ExpiryMetrics (loyalty.application.expiry)
    def currency_expired(self, lots: int, amount: int) -> None:
        self.currency_expired_lots.inc(lots)
        self.currency_expired_amount.inc(amount)

    # -- SpendingMetrics
    def account_command(self, command: str, outcome: str, amount: int) -> None:
        self.account_commands.labels(command, outcome).inc()
        if outcome == "applied":
            if command == "spend":
                self.currency_spent.inc(amount)
            elif command == "refund":
                self.currency_refunded.inc(amount)

    # -- DeliveryMetrics (loyalty.application.delivery)
    def delivery_progress(self, channel: str, *, position: int, head: int) -> None:
        self.delivery_lag.labels(channel).set(max(0, head - position))

    def delivery_error(self, channel: str, kind: str) -> None:
        self.delivery_errors.labels(channel, kind).inc()

    def webhook_attempt(self, outcome: str, n: int = 1) -> None:
        self.deliveries.labels(outcome).inc(n)

    def webhook_dead_letters(self, count: int) -> None:
        self.dead_letters.set(count)

    # -- JobMetrics (loyalty.application.jobs)
    def job_succeeded(self, job: str) -> None:
        self.jobs_run.labels(job).inc()
        self.jobs_last_success.labels(job).set_to_current_time()

    def job_failed(self, job: str, kind: str) -> None:
        self.jobs_failed.labels(job, kind).inc()

    def job_failing(self, job: str, failing: bool) -> None:
        self.jobs_failing.labels(job).set(1 if failing else 0)

    # -- ProjectionMetrics
    def projection_progress(self, name: str, *, position: int, head: int, applied: int) -> None:
        self.projection_position.labels(name).set(position)
        self.projection_lag.labels(name).set(max(0, head - position))
        if applied:
            self.projection_events.labels(name).inc(applied)

    def projection_quarantined(self, name: str, count: int) -> None:
        self.projection_quarantine.labels(name).inc(count)


# -------------------------------------------------------------------- ASGI middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "loyalty_request_id", default=None
)
REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def sane_request_id(value: str | None) -> str | None:
    """``value`` if it is a reasonable request id (token characters, at most 128)."""
    return value if value is not None and _SANE_REQUEST_ID.match(value) else None


class RequestIdMiddleware:
    """Accept a sane ``X-Request-ID`` or generate one; make it the logging context of
    the request and echo it in the response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = sane_request_id(value.decode("latin-1"))
                break
        request_id = incoming or uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


UNMATCHED_ROUTE = "unmatched"


class MetricsMiddleware:
    """Count and time HTTP requests by method, route template (never the raw path: it
    would hold user ids) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            labels = (scope.get("method", ""), template, str(status))
            self.metrics.http_requests.labels(*labels).inc()
            self.metrics.http_latency.labels(*labels).observe(time.perf_counter() - started)


# ------------------------------------------------------------------------------- logs


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id (in a request),
    exc (with a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request_id={request_id}]" if request_id else line


_HANDLER_MARK = "_loyalty_handler"
QUIET_LOGGERS = ("httpx", "httpcore")
"""Loggers kept at WARNING: they write URLs (webhook URLs) at INFO and DEBUG."""


def configure_logging(log_format: str, level: int = logging.INFO) -> logging.Handler:
    """Send every log record (ours, uvicorn's, libraries') to stderr in ``log_format``
    ("text" or "json"). Idempotent: replaces the handler a previous call installed."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    # The HTTP client logs every request's URL at INFO ("HTTP Request: POST <url>"):
    # webhook URLs hold tokens. Our own lines name the subscription id instead.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # uvicorn's loggers propagate to the root (uvicorn.run(log_config=None)).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
