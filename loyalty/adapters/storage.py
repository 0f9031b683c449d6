"""Storage accounting: rows and bytes per location, on both backends.

Every table of the database is listed (grouped by kind), so a table that grows without
an owner shows up here too. PostgreSQL: each ingress day partition on its own, bytes from
``pg_total_relation_size`` (table, indexes, TOAST). SQLite: bytes per table and its
indexes from the ``dbstat`` virtual table when the library has it, else an estimate
(used pages shared out by row count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from psycopg import sql

from loyalty.adapters.db import Database, psycopg_connection
from loyalty.adapters.tables import EVENT_STORE_TABLES, KEYS_PARTITION_PREFIX, caps_partition_day

READ_MODEL_TABLES = frozenset(
    {
        "member_balances",
        "member_history",
        "member_lots",
        "member_ranks",
        "projection_tracking",
        "projection_quarantine",
        "award_explanations",
    }
)
KIND_ORDER = (
    "ingress",
    "ingress_keys",
    "event_store",
    "read_model",
    "pipeline",
    "forget",
    "reporting",
    "rules",
    "webhooks",
    "access",
    "schema",
    "other",
)
KIND_NAMES: dict[str, str] = {
    "ingress": "ingested events",
    "ingress_keys": "ingest duplicate check",
    "event_store": "member accounts",
    "read_model": "member data (read models)",
    "pipeline": "pipeline",
    "forget": "forget-me",
    "reporting": "daily report",
    "rules": "rules",
    "webhooks": "webhooks",
    "access": "keys and sessions",
    "schema": "schema",
    "other": "other",
}
"""What each kind of location holds, as an operator reads it."""
TABLE_NAMES: dict[str, str] = {
    "ingress_events": "Ingested events",
    "ingress_keys": "Ingest duplicate check",
    "stream_ingress_keys": "Ingest duplicate check (JetStream ingress)",
    "stored_events": "Account events",
    "stored_snapshots": "Account snapshots",
    "members_events": "Account events",
    "members_snapshots": "Account snapshots",
    "member_balances": "Member balances",
    "member_history": "Member history",
    "member_lots": "Currency lots (expiry)",
    "member_ranks": "Member ranks",
    "projection_tracking": "Read-model positions",
    "projection_quarantine": "Quarantined account events",
    "award_explanations": "Award explanations",
    "pipeline_caps": "Daily cap counters",
    "pipeline_checkpoints": "Pipeline positions",
    "pipeline_pending": "Earnings not yet credited",
    "forget_markers": "Forget-me markers",
    "forget_requests": "Forget-me requests",
    "forget_subjects": "Forget-me subjects",
    "rollup_accounts": "Daily report: accounts",
    "rollup_activity": "Daily report: activity",
    "rollup_origin": "Daily report: starting points",
    "rollup_ranks": "Daily report: ranks",
    "rule_versions": "Rule versions",
    "rule_version_starts": "Rule version starts",
    "rule_compensations": "Compensation runs",
    "webhook_subscriptions": "Webhook subscriptions",
    "webhook_dead_letters": "Webhook dead letters",
    "delivery_cursors": "Delivery positions",
    "delivery_notices": "Notices owed to webhooks",
    "api_keys": "API keys",
    "console_sessions": "Console sessions",
    "alembic_version": "Schema version",
    "loyalty_meta": "Service metadata",
}
"""A name an operator understands for each table (the table stays the detail)."""
_KIND_BY_TABLE: dict[str, str] = {
    **dict.fromkeys(("rollup_accounts", "rollup_activity", "rollup_origin"), "reporting"),
    "rollup_ranks": "reporting",
    **dict.fromkeys(("rule_versions", "rule_version_starts", "rule_compensations"), "rules"),
    **dict.fromkeys(("webhook_subscriptions", "webhook_dead_letters"), "webhooks"),
    **dict.fromkeys(("delivery_cursors", "delivery_notices"), "webhooks"),
    **dict.fromkeys(("api_keys", "console_sessions"), "access"),
    **dict.fromkeys(("alembic_version", "loyalty_meta"), "schema"),
}


def table_name(table: str) -> str:
    """The operator's name of ``table`` (a PostgreSQL day partition names its day)."""
    if table.startswith("stream:"):
        return f"Ingested events, JetStream stream {table[7:]}"
    if table.startswith("ingress_events_") and table[15:].isdigit():
        day = table[15:]
        return f"Ingested events, {day[:4]}-{day[4:6]}-{day[6:8]}"
    if table.startswith(KEYS_PARTITION_PREFIX) and table[len(KEYS_PARTITION_PREFIX) :].isdigit():
        day = table[len(KEYS_PARTITION_PREFIX) :]
        return f"Ingest duplicate check, received from {day[:4]}-{day[4:6]}-{day[6:8]} (8 days)"
    caps_day = caps_partition_day(table)
    if caps_day is not None:
        return f"Daily cap counters, {caps_day[:4]}-{caps_day[4:6]}-{caps_day[6:8]}"
    return TABLE_NAMES.get(table, table)


@dataclass(frozen=True, slots=True)
class StorageLocation:
    name: str
    """The table (or partition): the detail."""
    kind: str
    rows: int
    bytes: int

    @property
    def label(self) -> str:
        """What it holds, as an operator reads it."""
        return table_name(self.name)

    @property
    def kind_label(self) -> str:
        return KIND_NAMES[self.kind]


@dataclass(slots=True)
class StorageReport:
    backend: str
    locations: list[StorageLocation] = field(default_factory=list)
    #: the whole database (PostgreSQL: pg_database_size; SQLite: file plus WAL)
    database_bytes: int = 0
    #: True when SQLite bytes per table are estimates (no dbstat)
    estimated: bool = False

    @property
    def total_rows(self) -> int:
        return sum(loc.rows for loc in self.locations)

    @property
    def total_bytes(self) -> int:
        return sum(loc.bytes for loc in self.locations)

    def to_wire(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "locations": [
                {
                    "name": loc.name,
                    "label": loc.label,
                    "kind": loc.kind,
                    "rows": loc.rows,
                    "bytes": loc.bytes,
                }
                for loc in self.locations
            ],
            "total": {"rows": self.total_rows, "bytes": self.total_bytes},
            "database_bytes": self.database_bytes,
            "estimated": self.estimated,
        }


def kind_of(table: str) -> str:
    if table.startswith("ingress_events"):
        return "ingress"
    if table.startswith(KEYS_PARTITION_PREFIX) or table in (
        "ingress_keys",
        "stream_ingress_keys",
    ):  # PostgreSQL: the dedup keys, a table per generation (SQLite: in the partition)
        return "ingress_keys"
    if table in EVENT_STORE_TABLES or table.endswith(("_events", "_snapshots")):
        return "event_store"
    if table in READ_MODEL_TABLES:
        return "read_model"
    if table.startswith("pipeline_"):
        return "pipeline"
    if table.startswith("forget_"):
        return "forget"
    return _KIND_BY_TABLE.get(table, "other")


def _ordered(locations: list[StorageLocation]) -> list[StorageLocation]:
    return sorted(locations, key=lambda loc: (KIND_ORDER.index(loc.kind), loc.name))


def storage_report(db: Database) -> StorageReport:
    report = _postgres(db) if db.backend == "postgresql" else _sqlite(db)
    if db.settings.ingress_url:  # the ingress log is a JetStream stream (issue 31)
        from loyalty.adapters.nats_log import jetstream_log  # the nats client only when used

        stream = jetstream_log(db)
        messages, size = stream.stream_bytes()
        report.locations = _ordered(
            [
                *report.locations,
                StorageLocation(f"stream:{stream.stream}", "ingress", messages, size),
            ]
        )
    return report


def _postgres(db: Database) -> StorageReport:
    report = StorageReport(backend="postgresql")
    with db.read() as conn:
        raw = psycopg_connection(conn)
        # ordinary tables (day partitions each on their own); not the empty parent
        tables = raw.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' ORDER BY 1"
        ).fetchall()
        for name, size in tables:
            row = raw.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))
            ).fetchone()
            rows = int(row[0]) if row else 0
            report.locations.append(StorageLocation(name, kind_of(name), rows, int(size)))
        total = raw.execute("SELECT pg_database_size(current_database())").fetchone()
        report.database_bytes = int(total[0]) if total else 0
    report.locations = _ordered(report.locations)
    return report


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def _sqlite(db: Database) -> StorageReport:
    report = StorageReport(backend="sqlite")
    with db.read() as conn:
        schema = conn.exec_driver_sql(
            "SELECT type, name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"
        ).all()
        tables = sorted(
            name for kind, name, _ in schema if kind == "table" and not name.startswith("sqlite_")
        )
        owner = {name: tbl for _, name, tbl in schema}
        rows = {
            t: int(conn.execute(sa.text(f'SELECT count(*) FROM "{t}"')).scalar_one())
            for t in tables
        }
        sizes: dict[str, int] = dict.fromkeys(tables, 0)
        try:
            stat = conn.exec_driver_sql("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").all()
        except sa.exc.OperationalError:  # no dbstat in this SQLite build
            stat = None
        if stat is not None:
            for name, size in stat:
                table = owner.get(name, name)
                if table in sizes:
                    sizes[table] += int(size)
        else:
            report.estimated = True
            page_size = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
            pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())
            free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar_one())
            used = (pages - free) * page_size
            all_rows = sum(rows.values()) or 1
            sizes = {t: used * rows[t] // all_rows for t in tables}
    report.locations = _ordered([StorageLocation(t, kind_of(t), rows[t], sizes[t]) for t in tables])
    report.database_bytes = _file_bytes(db.settings.sqlite_path)
    return report
