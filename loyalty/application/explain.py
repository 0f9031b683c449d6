"""Explain an award: ``GET /v1/members/{user_id}/awards/{award_id}``.

A recorded award's explanation is the summary its pending row accumulated (copied into
``award_explanations`` by the event insert that recorded it, see ``event_recorder``) plus
the amounts of the ``Awarded`` event; a pending award (not recorded yet) is explained from
the pending row itself and the account's carried fraction. The contributing events are
looked up in the ingress log (the member's events in the row's window range of its shard)
while they are retained; after retention the explanation says ``expired`` and keeps its
counts and sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from loyalty.application.pending import Position, award_id_for
from loyalty.domain import explain
from loyalty.domain.errors import AwardNotFound, MemberNotFound

PENDING_ALIAS = "pending"
EXPLANATION_KINDS = ("award", "compensation")
"""What an explanation explains: a pipeline award or a rules compensation."""
EXPLANATION_STATUSES = ("recorded", "pending")
MAX_LISTED_EVENTS = 1000


@dataclass(frozen=True, slots=True)
class Window:
    """The ingress range a pending row (and its award) was fed from: the member's
    events of ``shard`` in ``(start, end]``."""

    shard: int
    start: Position
    end: Position


@dataclass(frozen=True, slots=True)
class StoredExplanation:
    user_id: str
    award_id: str
    kind: str
    """``award`` (the pipeline) or ``compensation`` (``loyalty rules apply --compensate``)."""
    rule_version: int
    event_count: int
    exact_currency: Decimal
    exact_rank_points: Decimal
    currency: int
    rank_points: int
    fraction_currency: Decimal
    fraction_rank_points: Decimal
    window: Window | None
    summary: explain.Summary
    recorded_at: datetime | None


@dataclass(frozen=True, slots=True)
class ContributingEvent:
    source: str
    event_id: str
    event_type: str
    occurred_at: datetime


class ExplanationReader(Protocol):
    def recorded(self, user_id: str, award_id: str) -> StoredExplanation | None: ...
    def pending(self, user_id: str) -> StoredExplanation | None:
        """The pending row as an explanation (``currency``/``fraction_*`` unset: 0)."""
        ...

    def contributing(
        self, user_id: str, window: Window, limit: int
    ) -> tuple[int, Sequence[ContributingEvent]]:
        """How many of the member's events the ingress log still holds in ``window``,
        and the first ``limit`` of them."""
        ...


CarriedFraction = Callable[[str], tuple[Decimal, Decimal]]
"""The account's carried (currency, rank points) fraction; raises MemberNotFound."""


class Explanations:
    def __init__(self, store: ExplanationReader, carried: CarriedFraction) -> None:
        self._store = store
        self._carried = carried

    def explain(self, user_id: str, award_id: str) -> dict[str, Any]:
        """The explanation of ``award_id`` (or of the pending award: ``pending`` or its
        current id) as a JSON-ready dict; raises AwardNotFound."""
        found = self._store.recorded(user_id, award_id)
        pending = False
        if found is None:
            row = self._store.pending(user_id)
            if row is not None and award_id in (PENDING_ALIAS, row.award_id):
                found, pending = row, True
        if found is None:
            raise AwardNotFound()
        if pending:
            try:
                carried = self._carried(user_id)
            except MemberNotFound:
                carried = (Decimal(0), Decimal(0))
            currency = explain.pending_amounts(found.exact_currency, carried[0])
            points = explain.pending_amounts(found.exact_rank_points, carried[1])
        else:
            currency = explain.amounts(
                found.exact_currency, found.currency, found.fraction_currency
            )
            points = explain.amounts(
                found.exact_rank_points, found.rank_points, found.fraction_rank_points
            )
        summed = explain.totals(found.summary)
        return {
            "user_id": user_id,
            "award_id": found.award_id,
            "kind": found.kind,
            "status": "pending" if pending else "recorded",
            "recorded_at": None if found.recorded_at is None else found.recorded_at.isoformat(),
            "rule_versions": found.summary.get("rule_versions") or [found.rule_version],
            "event_count": found.event_count,
            "currency": currency.to_wire(pending=pending),
            "rank_points": points.to_wire(pending=pending),
            # False only for earnings counted before explanations were kept
            "complete": found.kind != "award"
            or summed == (found.exact_currency, found.exact_rank_points),
            "by_event_type": explain.types_to_wire(found.summary),
            "compensation": found.summary.get("compensation"),
            "events": self._events(user_id, found),
        }

    def _events(self, user_id: str, found: StoredExplanation) -> dict[str, Any]:
        if found.window is None:
            return {"status": "none" if found.kind != "award" else "unknown", "items": []}
        held, items = self._store.contributing(user_id, found.window, MAX_LISTED_EVENTS)
        status = "retained" if held >= found.event_count else "expired" if not held else "partial"
        return {
            "status": status,
            "retained": held,
            "truncated": held > len(items),
            "items": [
                {
                    "source": e.source,
                    "event_id": e.event_id,
                    "event_type": e.event_type,
                    "occurred_at": e.occurred_at.isoformat(),
                }
                for e in items
            ],
        }


def pending_award_id(window: Window) -> str:
    return award_id_for(window.shard, window.end)
