"""Settings: every knob of the service, read from ``LOYALTY_*`` environment variables.

Nothing here is built at import time; call :func:`Settings` (or pass values) where the
process is composed (``create_app``, the CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/loyalty.db"


class Settings(BaseSettings):
    """Service settings (environment prefix ``LOYALTY_``)."""

    model_config = SettingsConfigDict(env_prefix="LOYALTY_", extra="ignore", frozen=True)

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="sqlite:///path/to/file.db (embedded) or postgresql://user@host:port/db",
    )
    retention_days: int = Field(7, ge=1, le=3650, description="days ingress events are kept")
    ingress_url: str = Field(
        "",
        pattern=r"^(nats://.*)?$",
        description="where the ingress (activity) log lives: empty for the database "
        "(the default), or nats://host:port for a NATS JetStream stream (issue 31); the "
        "database stays the system of record for everything else",
    )
    ingress_stream: str = Field(
        "LOYALTY_INGRESS",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="the JetStream stream of the ingress log (with a nats:// ingress_url)",
    )
    ingress_duplicate_window_seconds: float = Field(
        600.0,
        ge=10,
        le=86_400,
        description="JetStream's own de-duplication window (Nats-Msg-Id) on the ingress "
        "stream; past it the database's key table de-duplicates (docs/deployment.md)",
    )
    retention_interval_seconds: float = Field(
        3600.0, ge=0, description="how often the worker runs retention (0: never)"
    )
    dry_run_duty: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of the time a rule dry run reads and weighs; it sleeps the "
        "rest between chunks, so the live pipeline keeps its share of CPU (1: no pause)",
    )
    expiry_interval_seconds: float = Field(
        3600.0,
        ge=0,
        description="how often the worker expires due currency lots (0: never; "
        "only with currency_expiry in the rules)",
    )
    max_batch_events: int = Field(10_000, ge=1, description="events per ingress batch")
    max_batch_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="bytes per batch body")
    max_attributes_bytes: int = Field(4096, ge=2, description="bytes of one event's attributes")
    max_request_bytes: int = Field(
        1024 * 1024, ge=1024, description="bytes of any other request body (413 above)"
    )
    ingest_rate_limit_events_per_s: float = Field(
        200_000.0, ge=0, description="events per second one ingest key may send (0: no limit)"
    )
    ingest_rate_limit_burst: int = Field(
        400_000,
        ge=0,
        description="events one ingest key may send at once after a pause "
        "(at least max_batch_events is always allowed)",
    )
    future_skew_seconds: int = Field(300, ge=0, description="how far in the future is accepted")
    auth_cache_seconds: float = Field(
        5.0, ge=0, description="how long a verified key is trusted before it is re-read"
    )
    db_pool_size: int = Field(
        10,
        ge=1,
        le=1000,
        description="PostgreSQL connections per process, in all (before issue 27 it "
        "sized each pool, and a process could hold 5x it): 3/5 for its SQLAlchemy pool "
        "and its one lease session, 2/5 for its one event-store pool, no overflow; a "
        "checkout waits up to 30 s for a free connection. `serve` is 3 processes (3x "
        "this), `serve --no-worker` and `loyalty worker` 1x each (docs/deployment.md); "
        "below 2 counts as 2 (one per pool)",
    )
    db_application_name: str = Field(
        "loyalty",
        min_length=1,
        max_length=60,
        pattern=r"^[ -~]+$",
        description="application_name of the process's connections (pg_stat_activity); "
        "serve's worker children add -pipeline and -read-model",
    )
    shard_count: int = Field(16, ge=1, le=1024, description="pipeline shards (fixed per db)")
    award_window_seconds: float = Field(
        1.0, gt=0, le=3600, description="how long events accumulate before one award per member"
    )
    award_interval_seconds: float = Field(
        3600.0,
        ge=0,
        le=86_400 * 7,
        description="at most one recorded award per member per interval (pending between)",
    )
    pipeline_chunk: int = Field(
        50_000, ge=1, le=1_000_000, description="most ingress events one shard window reads"
    )
    aggregate_cache_size: int = Field(
        10_000, ge=0, description="member aggregates cached per process"
    )
    snapshot_interval: int = Field(
        100,
        ge=0,
        le=1_000_000,
        description="a member's account is snapshotted every this many events, so loading it "
        "reads the latest snapshot and the events after it (0: take no new snapshots)",
    )
    forget_settle_seconds: float = Field(
        2.0,
        ge=0,
        le=300,
        description="forget-me waits this long before erasing, so that processes evict "
        "the member from their caches first (politeness only: the event insert refuses "
        "writes into an erased stream whatever the wait; 0 is safe)",
    )
    marker_refresh_seconds: float = Field(
        1.0, gt=0, le=60, description="how often a process re-reads the forget markers"
    )
    webhook_allow_private_urls: bool = Field(
        False,
        description="let webhook URLs point at loopback, private, link-local or metadata "
        "addresses (tests, closed networks)",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="how long one webhook delivery may take"
    )
    webhook_retry_seconds: float = Field(
        3 * 3600.0,
        ge=0,
        le=7 * 86400,
        description="how long a failing webhook delivery is retried (exponential backoff "
        "with jitter) before it becomes a dead letter",
    )
    http_max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="bytes of a request line plus headers (431 above)"
    )
    http_max_headers: int = Field(100, ge=10, description="headers per request (431 above)")
    http_header_timeout_seconds: float = Field(
        10.0, gt=0, description="seconds a request's line and headers may take to arrive (408)"
    )
    http_body_timeout_seconds: float = Field(
        30.0, gt=0, description="seconds a request's body may take to arrive (408)"
    )
    http_keep_alive_seconds: float = Field(
        5.0, gt=0, description="seconds an idle kept-alive connection stays open"
    )
    http_max_connections: int = Field(
        1000, ge=1, description="open connections per serve process (503 and close above)"
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="GET /metrics on the API port needs Authorization: Bearer <this> "
        "(unset: no /metrics on the API port)",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve also serves its metrics on this port (no auth)"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="interface of metrics_port (0.0.0.0 in a container)"
    )
    console_session_minutes: int = Field(
        480, ge=1, le=7 * 24 * 60, description="how long an operator console session lasts"
    )
    console_alert_lag_seconds: float = Field(
        300.0, ge=0, description="the console alerts when the pipeline lags more than this"
    )
    console_alert_dead_letters: int = Field(
        1, ge=1, description="the console alerts at this many webhook dead letters"
    )
    console_figures_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="the console dashboard recomputes its storage report at most this often "
        "(it counts every table; the rest, today's report included, is live)",
    )
    access_log: bool = Field(
        False, description="log one line per HTTP request (method, path, status) on stderr"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines on stderr (json: one object per line)"
    )
    export_pseudonym_key: SecretStr | None = Field(
        None,
        description="secret of `loyalty export`'s member pseudonyms (HMAC-SHA256 of the user "
        "id), at least 32 characters; unset: account events are not exported",
        min_length=32,
    )

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value.startswith("sqlite:///"):
            return value
        for prefix in ("postgresql://", "postgresql+psycopg://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql://" + value[len(prefix) :]
        raise ValueError("must start with sqlite:/// or postgresql://")

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.database_url.startswith("sqlite:") else "postgresql"

    @property
    def sqlite_path(self) -> Path:
        if self.backend != "sqlite":
            raise ValueError("not a SQLite database URL")
        return Path(self.database_url[len("sqlite:///") :])

    @property
    def sqlalchemy_url(self) -> str:
        if self.backend == "sqlite":
            return f"sqlite+pysqlite:///{self.sqlite_path}"
        return "postgresql+psycopg://" + self.database_url[len("postgresql://") :]
