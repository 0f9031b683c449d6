"""What the explanation and dry-run routes answer."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    Field,
)

from loyalty.application.explain import EXPLANATION_KINDS, EXPLANATION_STATUSES

# ---------------------------------------------------------------- explanations (#20)


class AmountsBody(BaseModel):
    """``carried_in + contributed == credited + carried_out`` (``to_credit`` in place of
    ``credited`` while pending), exactly (decimal strings)."""

    contributed: str = Field(description="exact sum of the events' weights, before rounding")
    carried_in: str = Field(description="the account's fraction before the award")
    credited: int | None = Field(
        description="whole units credited on the account (null while the award is pending)"
    )
    to_credit: int | None = Field(
        description="while pending: the whole units the next recording will credit (null "
        "once recorded)"
    )
    carried_out: str = Field(description="the fraction carried to the next award")


class ExplanationBody(BaseModel):
    user_id: str
    award_id: str
    kind: str = Field(
        description="award (the pipeline) | compensation (rules apply)",
        json_schema_extra={"enum": list(EXPLANATION_KINDS)},
    )
    status: str = Field(
        description="recorded | pending (not yet on the account)",
        json_schema_extra={"enum": list(EXPLANATION_STATUSES)},
    )
    recorded_at: str | None
    rule_versions: list[int] = Field(
        description="every rule version that weighed its events, oldest first (one for most awards)"
    )
    event_count: int
    currency: AmountsBody
    rank_points: AmountsBody
    complete: bool = Field(
        description="the per-type sums add up to the award (false only for earnings "
        "counted before explanations were kept)"
    )
    by_event_type: list[dict[str, Any]] = Field(
        description="per event type: events, capped [{daily_cap, events}], multipliers "
        "[{when, factor, events}], exact currency and rank_points contributed"
    )
    compensation: dict[str, Any] | None = Field(
        None, description="for a compensation: the rule versions, period and shortfall"
    )
    events: dict[str, Any] = Field(
        description="contributing ingress events: status retained | partial | expired "
        "(after retention) | none; items [{source, event_id, event_type, occurred_at}] "
        "(at most 1000, truncated says so)"
    )


class DryRunBody(BaseModel):
    period: dict[str, str] = Field(description="{from, to}: whole UTC days, both included")
    warnings: list[str] = Field(
        default_factory=list, description="e.g. the period holds no retained events"
    )
    current_version: int
    events: int = Field(description="retained ingress events weighed")
    members: int
    members_with_difference: int
    members_with_different_rank: int
    totals: dict[str, Any] = Field(
        description="currency and rank_points: {current, candidate, difference} (exact)"
    )
    largest_differences: list[dict[str, Any]] = Field(
        description="the 20 largest per-member differences: user_id, currency, "
        "rank_points ({current, candidate, difference}), rank {current, candidate}"
    )
    by_event_type: list[dict[str, Any]] = Field(
        description="per event type: events, capped {current, candidate}, currency, rank_points"
    )
    seconds: float
