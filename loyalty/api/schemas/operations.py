"""The operator routes' documents: the rules document's reading, pipeline, storage."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from loyalty.adapters.storage import KIND_ORDER
from loyalty.api.guards import BodyProblem, parse_json_document


def rules_document(body: bytes) -> dict[str, Any]:
    """The one reading of a rules document, for every entrypoint (``PUT /v1/rules``, the
    console's editor and dry run, ``loyalty rules load|dry-run|apply``): JSON as
    :func:`~loyalty.api.guards.parse_json_document` reads it (an object repeating a key is
    refused), and an object; the command model
    (:class:`loyalty.application.commands.rules.RulesRequest`) judges the rest.
    Raises :class:`~loyalty.api.guards.BodyProblem`."""
    wire = parse_json_document(body)
    if not isinstance(wire, dict):
        raise BodyProblem(422, "invalid_rules", "must be a JSON object")
    return wire


class PipelineBody(BaseModel):
    pending: int = Field(description="ingress events not yet processed")
    oldest_pending_age_s: float | None = Field(description="age of the oldest pending event")
    processed_total: int
    awards_total: int
    quarantined_events: int = Field(
        0,
        description="account events the read models passed over because they could not "
        "apply them (see `loyalty doctor`); 0 when healthy",
    )


# -------------------------------------------------------------------------- storage


class StorageLocationBody(BaseModel):
    name: str = Field(description="table (PostgreSQL: each ingress day partition on its own)")
    kind: str = Field(
        description="what the table holds: " + ", ".join(KIND_ORDER),
        json_schema_extra={"enum": list(KIND_ORDER)},
    )
    rows: int
    bytes: int = Field(description="table, indexes and TOAST (SQLite: pages per dbstat)")


class StorageTotalBody(BaseModel):
    rows: int
    bytes: int


class StorageBody(BaseModel):
    backend: str
    locations: list[StorageLocationBody]
    total: StorageTotalBody
    database_bytes: int = Field(description="the whole database (SQLite: file plus WAL)")
    estimated: bool = Field(description="SQLite without dbstat: bytes shared out by row count")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "backend": "postgresql",
                    "locations": [
                        {
                            "name": "ingress_events_p20261126",
                            "kind": "ingress",
                            "rows": 1000000,
                            "bytes": 412000000,
                        },
                        {"name": "members_events", "kind": "event_store", "rows": 1200, "bytes": 0},
                    ],
                    "total": {"rows": 1001200, "bytes": 412000000},
                    "database_bytes": 420000000,
                    "estimated": False,
                }
            ]
        }
    )
