"""Periods of UTC days a command reads: a report's range, a dry run's period."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from loyalty.application.commands.fields import (
    Day,
)


class ReportRange(BaseModel):
    """A range of UTC days, both included (the reports; blank: the page's default)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Day | None = Field(None, alias="from")
    to: Day | None = None


class DryRunPeriod(BaseModel):
    """The console's dry-run period: UTC days ``from`` .. ``through``, both included."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Day = Field(alias="from")
    through: Day


class DryRunRequest(BaseModel):
    """A candidate rule set and a period of whole UTC days inside retention."""

    model_config = ConfigDict(extra="forbid")

    rules: dict[str, Any] = Field(description="a rules document, as for PUT /v1/rules")
    from_: Day | None = Field(None, alias="from", description="first day (YYYY-MM-DD)")
    to: Day | None = Field(
        None, description="last day (YYYY-MM-DD), included; default today (from: the day before)"
    )
