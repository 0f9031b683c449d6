"""What ``POST /v1/events`` answers."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    Field,
)

from loyalty.application.ingress import REJECT_REASONS


class RejectedEvent(BaseModel):
    index: int
    event_id: str
    reason: str = Field(
        description="too_old: older than the retention window; in_future: beyond the "
        "allowed clock skew; forgotten: the member asked to be forgotten after it occurred",
        json_schema_extra={"enum": list(REJECT_REASONS)},
    )


class DuplicateEvent(BaseModel):
    index: int = Field(description="position of the event in the batch")
    event_id: str
    kind: Literal["repeat", "conflict"] = Field(
        description=(
            "repeat: the same event (user_id, type, occurred_at, attributes) was sent "
            "before (in this batch or stored earlier); conflict: this event_id was used "
            "before for other content -- this event was not stored"
        )
    )


class BatchAccepted(BaseModel):
    batch_id: str = Field(description="the request's batch_id, or a generated one")
    accepted: int = Field(description="events stored")
    duplicates: int = Field(description="events not stored: their event_id was seen before")
    rejected: list[RejectedEvent]
    conflicts: int = Field(description="how many of the duplicates are conflicts")
    duplicate_events: list[DuplicateEvent] = Field(description="each duplicate, in batch order")
    unweighed_types: dict[str, int] = Field(
        description=(
            "accepted events by type, for the types no rule of the current rule set "
            "weighs (they earn nothing now; a later rule set may weigh them)"
        )
    )
