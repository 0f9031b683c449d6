"""The naive design: every activity event appended to the event store as one stream
event (a new aggregate per event, id ``uuid5(source:event_id)`` so a resend would
collide), through the ``eventsourcing`` library's POSTGRES persistence module."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

NAMESPACE = uuid.UUID("5f0c2a4e-8a44-4a8e-9d7c-3b8d1f0e6a11")


class Activity(Aggregate):
    @staticmethod
    def create_id(source: str, event_id: str, **_: Any) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"{source}:{event_id}")

    @event("Received")
    def __init__(
        self,
        source: str,
        event_id: str,
        user_id: str,
        type: str,
        occurred_at: datetime,
        attributes: dict[str, Any],
    ) -> None:
        self.source = source
        self.event_id = event_id
        self.user_id = user_id
        self.type = type
        self.occurred_at = occurred_at
        self.attributes = attributes


class NaiveIngress(Application):  # type: ignore[type-arg]
    """Table ``naiveingress_events``."""

    is_snapshotting_enabled = False


TABLE = "naiveingress_events"


def env_for(database_url: str) -> dict[str, str]:
    parts = urlsplit(database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_PASSWORD": parts.password or "unused-with-trust-auth",
        "POSTGRES_POOL_SIZE": "4",
    }


def open_app(database_url: str, *, create_table: bool = True) -> NaiveIngress:
    """Create the tables once, then open with ``create_table=False`` in each worker
    (concurrent CREATE TABLE IF NOT EXISTS fails with "tuple concurrently updated")."""
    env = env_for(database_url)
    env["CREATE_TABLE"] = "y" if create_table else "n"
    return NaiveIngress(env=env)
