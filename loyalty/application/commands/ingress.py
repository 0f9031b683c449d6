"""A batch of activity events (``POST /v1/events``, the simulator)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)

from loyalty.application.commands.fields import (
    EventType,
    Identifier,
    UserIdentifier,
    rfc3339_field,
)


class IngressEvent(BaseModel):
    """One activity event."""

    model_config = ConfigDict(extra="forbid")

    event_id: Identifier = Field(description="unique per source; a resend is a duplicate")
    user_id: UserIdentifier = Field(
        description="opaque member id: NFC, no control/format characters, no /, <= 128"
    )
    type: EventType = Field(description="activity type, e.g. played_game")
    occurred_at: Annotated[datetime, BeforeValidator(rfc3339_field)] = Field(
        description="RFC 3339 with an explicit offset", examples=["2026-11-26T10:00:00Z"]
    )
    attributes: dict[str, Any] = Field(
        default_factory=dict, description="free-form, at most 4 KiB as JSON"
    )


class Batch(BaseModel):
    """A batch of activity events from one source."""

    model_config = ConfigDict(extra="forbid")

    batch_id: Identifier | None = Field(
        default=None,
        description=(
            "the client's label of this request, echoed in the response (a random one "
            "when omitted) so that a client can match responses and logs to requests. "
            "It is not stored and not a key of idempotency: a batch is idempotent per "
            "event (a resent event_id is a duplicate), so resending a batch, under the "
            "same batch_id or another, stores only the events not stored before"
        ),
    )
    events: list[IngressEvent]
