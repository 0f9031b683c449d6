"""Responses every route shares: problem details, health."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)


class FieldError(BaseModel):
    loc: str = Field(description="e.g. events[3].occurred_at")
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    code: str = Field(description="stable machine-readable error code")
    detail: str | None = None
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: str
