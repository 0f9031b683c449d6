"""Apply a new rule set with compensation (``loyalty rules apply FILE --since T
--compensate``).

The new rules become current first (stored as the next version, unless the current
version already is this rule set: a re-run). Then, for the period from the start of
``since``'s UTC day to the moment the new version was stored (``until``: the version's
creation time, so every re-run computes the same period), the retained ingress is weighed
under the old and the new version exactly as the dry run does (events received before
``until`` only: later ones are weighed by the pipeline under the new rules already).

Each member whose whole units differ (``floor(new exact sum) - floor(old exact sum)``, for
currency and rank points) gets **one** adjustment with the id ``rules-v<new version>``
(source ``rules``): idempotent per member, so a re-run, or a run after ``kill -9``, applies
only what is missing and the second complete run applies nothing. A deduction never takes a
balance below zero: it deducts what is there (pending earnings included) and the rest is
the member's *shortfall*, stated in its explanation and summed in the receipt. Each
compensation is explained (``award_explanations``, kind ``compensation``: both sides per
event type). The run's row (``rule_compensations``) holds the period and, at the end, the
receipt (totals only, no user id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from loyalty.application.dryrun import DryRun, MemberDifference
from loyalty.application.explain import StoredExplanation
from loyalty.domain import explain
from loyalty.domain.errors import PeriodNotRetained
from loyalty.domain.rules import RuleSet, rule_set_to_wire, split_whole

log = logging.getLogger(__name__)

COMPENSATION_PREFIX = "rules-v"
SOURCE = "rules"


def compensation_id(new_version: int) -> str:
    """The adjustment id of every member's compensation for ``new_version``."""
    return f"{COMPENSATION_PREFIX}{new_version}"


@dataclass(frozen=True, slots=True)
class Run:
    new_version: int
    old_version: int
    since: datetime
    until: datetime
    state: str
    receipt: dict[str, Any] | None


class CompensationRuns(Protocol):
    def get(self, new_version: int) -> Run | None: ...
    def start(self, run: Run) -> Run:
        """Insert the run (or return the one stored for that version)."""
        ...

    def finish(self, new_version: int, receipt: dict[str, Any], at: datetime) -> None: ...


class VersionedRules(Protocol):
    def current_uncached(self) -> RuleSet: ...
    def put(self, wire: dict[str, object]) -> RuleSet: ...
    def version(self, version: int) -> tuple[RuleSet, datetime] | None: ...


class Compensating(Protocol):
    def compensate(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        source: str | None = None,
    ) -> tuple[int, int, bool]: ...


class ExplanationWriter(Protocol):
    def put(self, row: StoredExplanation) -> None: ...


def same_rules(a: RuleSet, b: RuleSet) -> bool:
    """The same rules and ladder, whatever the version numbers."""
    wire_a, wire_b = rule_set_to_wire(a), rule_set_to_wire(b)
    wire_a.pop("version")
    wire_b.pop("version")
    return wire_a == wire_b


def _whole(value: Decimal) -> int:
    return split_whole(value)[0]


class Compensation:
    def __init__(
        self,
        rules: VersionedRules,
        runs: CompensationRuns,
        dry_run: DryRun,
        accounts: Compensating,
        explanations: ExplanationWriter,
        *,
        clock: Callable[[], datetime],
        crash_hook: Callable[[str], None] | None = None,
    ) -> None:
        self._rules = rules
        self._runs = runs
        self._dry = dry_run
        self._accounts = accounts
        self._explanations = explanations
        self._clock = clock
        self._crash_hook = crash_hook or (lambda _step: None)

    def apply(self, wire: dict[str, object], since: datetime, candidate: RuleSet) -> dict[str, Any]:
        """Make ``candidate`` (parsed from ``wire``) current and compensate every member
        for the period since ``since``; returns the receipt."""
        first = since.astimezone(UTC).date()
        current = self._rules.current_uncached()
        run = self._runs.get(current.version) if same_rules(current, candidate) else None
        if run is None:
            if same_rules(current, candidate) and current.version > 1:
                new = current  # stored by a run that died before it noted itself
            else:
                self._dry.period(first, self._clock().astimezone(UTC).date() + timedelta(days=1))
                new = self._rules.put(wire)
                self._crash_hook("stored")
            found = self._rules.version(new.version)
            assert found is not None
            run = self._runs.start(
                Run(new.version, new.version - 1, since, found[1], "running", None)
            )
        if run.state == "done" and run.receipt is not None:
            return {**run.receipt, "already_done": True}
        return self._compensate(run, first)

    def _compensate(self, run: Run, first: date) -> dict[str, Any]:
        old = self._rules.version(run.old_version)
        new = self._rules.version(run.new_version)
        assert old is not None and new is not None
        end = run.until.astimezone(UTC).date() + timedelta(days=1)
        try:
            self._dry.period(first, end)
        except PeriodNotRetained:
            raise
        comparison = self._dry.compare(
            new[0], first, end, current=old[0], received_before=run.until, summaries=True
        )
        adjustment_id = compensation_id(run.new_version)
        receipt: dict[str, Any] = {
            "new_version": run.new_version,
            "old_version": run.old_version,
            "period": {"from": first.isoformat(), "until": run.until.isoformat()},
            "events": comparison.events,
            "members_compared": len(comparison.members),
            "members_compensated": 0,
            "applied_now": 0,
            "replayed": 0,
            "currency_added": 0,
            "currency_deducted": 0,
            "rank_points_added": 0,
            "rank_points_deducted": 0,
            "shortfall_members": 0,
            "shortfall_currency": 0,
            "shortfall_rank_points": 0,
        }
        for user_id in sorted(comparison.members):
            member = comparison.members[user_id]
            currency = _whole(member.candidate.currency) - _whole(member.current.currency)
            points = _whole(member.candidate.rank_points) - _whole(member.current.rank_points)
            if not (currency or points):
                continue
            reason = f"rules v{run.old_version} -> v{run.new_version} since {first.isoformat()}"
            applied_c, applied_p, replayed = self._accounts.compensate(
                user_id, adjustment_id, currency, points, reason, SOURCE
            )
            self._crash_hook("compensated")
            short_c, short_p = applied_c - currency, applied_p - points
            self._explanations.put(
                self._explanation(run, first, member, (currency, points), (applied_c, applied_p))
            )
            receipt["members_compensated"] += 1
            receipt["replayed" if replayed else "applied_now"] += 1
            receipt["currency_added"] += max(applied_c, 0)
            receipt["currency_deducted"] += max(-applied_c, 0)
            receipt["rank_points_added"] += max(applied_p, 0)
            receipt["rank_points_deducted"] += max(-applied_p, 0)
            if short_c or short_p:
                receipt["shortfall_members"] += 1
                receipt["shortfall_currency"] += short_c
                receipt["shortfall_rank_points"] += short_p
        self._runs.finish(run.new_version, receipt, self._clock())
        return {**receipt, "already_done": False}

    def _explanation(
        self,
        run: Run,
        first: date,
        member: MemberDifference,
        requested: tuple[int, int],
        applied: tuple[int, int],
    ) -> StoredExplanation:
        current = member.current_summary or dict(explain.EMPTY)
        candidate = member.candidate_summary or dict(explain.EMPTY)
        summary = {
            "rule_versions": [run.old_version, run.new_version],
            "types": candidate["types"],
            "compensation": {
                "old_version": run.old_version,
                "new_version": run.new_version,
                "period": {"from": first.isoformat(), "until": run.until.isoformat()},
                "current": {
                    "currency": f"{member.current.currency:f}",
                    "rank_points": f"{member.current.rank_points:f}",
                    "by_event_type": explain.types_to_wire(current),
                },
                "candidate": {
                    "currency": f"{member.candidate.currency:f}",
                    "rank_points": f"{member.candidate.rank_points:f}",
                },
                "requested": {"currency": requested[0], "rank_points": requested[1]},
                "applied": {"currency": applied[0], "rank_points": applied[1]},
                "shortfall": {
                    "currency": applied[0] - requested[0],
                    "rank_points": applied[1] - requested[1],
                },
            },
        }
        return StoredExplanation(
            user_id=member.user_id,
            award_id=compensation_id(run.new_version),
            kind="compensation",
            rule_version=run.new_version,
            event_count=sum(line["events"] for line in candidate["types"].values()),
            exact_currency=Decimal(applied[0]),
            exact_rank_points=Decimal(applied[1]),
            currency=applied[0],
            rank_points=applied[1],
            fraction_currency=Decimal(0),
            fraction_rank_points=Decimal(0),
            window=None,
            summary=summary,
            recorded_at=None,
        )
