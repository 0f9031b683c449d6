"""Apply a new rule set with compensation (``loyalty rules apply FILE --since T
--compensate``).

**Which events a rules version applies to** (the pipeline's side, see
``loyalty.application.pipeline``): a window is weighed under the newest version stored
when its end is noted (read in the noting transaction, after the checkpoint row's lock;
no cache), and that version is noted with the window. Hence version V applies to every
window noted after V was stored: to every event received after V was stored, and to the
events still unprocessed then. Per shard, the position where V took effect
(``rule_version_starts``) is the start of the first window noted under V (or newer);
every ingress row at or before it was weighed under an older version, every row after it
under V or newer.

**What a compensation for V corrects**: exactly the rows weighed under older versions.
The new version and its run (``rule_compensations``, ``running``) are stored in one
transaction. The run then fixes, per shard, where V took effect (a shard that has noted
no window under V yet gets it fixed now, under its checkpoint row's lock: the end of the
window noted under the older version, if one is noted, else the checkpoint position) and
weighs, from the start of ``since``'s UTC day, the retained rows at or before that
position under V-1 and V exactly as the dry run does. Rows after it are the pipeline's
(weighed under V already) and are never compensated, however late the pipeline was.

Each member whose whole units differ (``floor(new exact sum) - floor(old exact sum)``, for
currency and rank points) gets **one** adjustment with the id ``rules-v<new version>``
(source ``rules``): idempotent per member, so a re-run, or a run after ``kill -9``, applies
only what is missing and the second complete run applies nothing. A deduction never takes a
balance below zero: it deducts what is there (pending earnings included) and the rest is
the member's *shortfall*, stated in its explanation and summed in the receipt.

**Erasure**: the run reads the erasure generation before it weighs anything and passes it
to every save, as the pipeline does: the event insert refuses a member being erased or
erased since (no account is created for such a member), and the run skips it (counted
as ``erased_members``). Events of members forgotten before the run (occurred before the
request) are not weighed. The explanation (``award_explanations``, kind
``compensation``) is written only while the member's stream exists, under a lock the
erasure's deletion waits for.

**Unfinished runs** are found and finished by the next ``rules apply --compensate``
(whatever happened to the rules since: the run keeps its versions and each shard's start),
or by ``loyalty rules compensation resume V``; ``loyalty rules compensation abandon V``
ends one without finishing it, with a receipt. ``loyalty doctor`` lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from loyalty.application.commands.rules import rule_set_to_wire
from loyalty.application.dryrun import DryRun, MemberDifference
from loyalty.application.explain import StoredExplanation
from loyalty.application.pipeline import IngressRow
from loyalty.domain import explain
from loyalty.domain.rules import RuleSet, split_whole

log = logging.getLogger(__name__)

COMPENSATION_PREFIX = "rules-v"
SOURCE = "rules"
RUNNING, DONE, ABANDONED = "running", "done", "abandoned"
Position = tuple[int, int]


def compensation_id(new_version: int) -> str:
    """The adjustment id of every member's compensation for ``new_version``."""
    return f"{COMPENSATION_PREFIX}{new_version}"


class RunNotFound(LookupError):
    """No compensation run for that version, or not one that can be resumed/abandoned."""


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
    def unfinished(self) -> list[Run]:
        """Runs still ``running``, oldest version first."""
        ...

    def start(self, run: Run) -> Run:
        """Insert the run (or return the one stored for that version)."""
        ...

    def finish(self, new_version: int, receipt: dict[str, Any], at: datetime) -> None: ...
    def abandon(self, new_version: int, receipt: dict[str, Any], at: datetime) -> bool:
        """Mark a ``running`` run abandoned with ``receipt``; False if it was not running."""
        ...

    def compensated(self, new_version: int) -> int:
        """How many members hold an explanation of this run's compensation."""
        ...

    def put_explanation(self, row: StoredExplanation) -> bool:
        """Store a compensation's explanation only while the member's stream exists
        (under a lock its erasure waits for); False: nothing stored."""
        ...


class VersionedRules(Protocol):
    def current_uncached(self) -> RuleSet: ...
    def put(
        self,
        wire: dict[str, object],
        now: datetime | None = None,
        *,
        compensate_since: datetime | None = None,
        author: str | None = None,
    ) -> RuleSet: ...
    def version(self, version: int) -> tuple[RuleSet, datetime] | None: ...


class VersionStarts(Protocol):
    def version_starts(self, version: int, shards: Sequence[int]) -> Mapping[int, Position]:
        """Per shard, where ``version`` took effect (fixed now for a shard that has not
        noted a window under it yet)."""
        ...


class ErasureView(Protocol):
    """The forget markers (``loyalty.application.erasure.MarkerCache``)."""

    def invalidate(self) -> None: ...
    def any(self) -> bool: ...
    def fence(self) -> int: ...
    def forgotten_at(self, user_id: str) -> datetime | None: ...


class Compensating(Protocol):
    def compensate(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        source: str | None = None,
        fence: int | None = None,
    ) -> tuple[int, int, bool] | None:
        """None: refused, the member is being erased or was erased after ``fence``."""
        ...


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
        starts: VersionStarts,
        markers: ErasureView | None,
        *,
        shard_count: int,
        clock: Callable[[], datetime],
        crash_hook: Callable[[str], None] | None = None,
    ) -> None:
        self._rules = rules
        self._runs = runs
        self._dry = dry_run
        self._accounts = accounts
        self._starts = starts
        self._markers = markers
        self._shards = list(range(shard_count))
        self._clock = clock
        self._crash_hook = crash_hook or (lambda _step: None)

    def apply(
        self,
        wire: dict[str, object],
        since: datetime,
        candidate: RuleSet,
        author: str | None = None,
    ) -> dict[str, Any]:
        """Make ``candidate`` (parsed from ``wire``) current, stored by ``author``, and
        compensate every member for the period since ``since``; returns the receipt.
        Every unfinished run is finished first (listed under ``resumed``), whatever
        rules were stored since."""
        first = since.astimezone(UTC).date()
        resumed = [self._compensate(run) for run in self._runs.unfinished()]
        current = self._rules.current_uncached()
        run: Run | None = None
        if same_rules(current, candidate) and current.version > 1:
            # a re-run, or a version stored without compensation (a plain change of the
            # same rules): compensate for it
            run = self._runs.get(current.version)
            if run is None:
                found = self._rules.version(current.version)
                assert found is not None
                run = self._runs.start(
                    Run(current.version, current.version - 1, since, found[1], RUNNING, None)
                )
        if run is None:
            self._dry.period(first, self._clock().astimezone(UTC).date())  # through today
            new = self._rules.put(wire, compensate_since=since, author=author)
            self._crash_hook("stored")
            run = self._runs.get(new.version)
            assert run is not None
        if run.state != RUNNING and run.receipt is not None:
            done_now = any(r["new_version"] == run.new_version for r in resumed)
            receipt = {**run.receipt, "already_done": not done_now}
        else:
            receipt = self._compensate(run)
        others = [r for r in resumed if r["new_version"] != run.new_version]
        return {**receipt, "resumed": others} if others else receipt

    def resume(self, new_version: int) -> dict[str, Any]:
        """Finish the unfinished run of ``new_version`` (``rules compensation resume``)."""
        run = self._runs.get(new_version)
        if run is None:
            raise RunNotFound(f"no compensation run for rules version {new_version}")
        if run.state != RUNNING:
            return {**(run.receipt or {}), "already_done": True}
        return self._compensate(run)

    def abandon(self, new_version: int) -> dict[str, Any]:
        """End the unfinished run of ``new_version`` without finishing it; its receipt
        says how many members it had compensated (they keep their adjustments)."""
        run = self._runs.get(new_version)
        if run is None or run.state != RUNNING:
            state = "no run" if run is None else f"the run is {run.state}"
            raise RunNotFound(f"rules version {new_version}: {state}, nothing to abandon")
        at = self._clock()
        receipt = {
            "new_version": run.new_version,
            "old_version": run.old_version,
            "state": ABANDONED,
            "period": {
                "from": run.since.astimezone(UTC).date().isoformat(),
                "until": run.until.isoformat(),
            },
            # members whose explanation was written; a run killed between a member's
            # adjustment and its explanation leaves at most one more member adjusted
            "members_compensated_before_abandoned": self._runs.compensated(new_version),
            "members_maybe_adjusted_without_explanation": 1,
            "abandoned_at": at.isoformat(),
        }
        if not self._runs.abandon(new_version, receipt, at):
            raise RunNotFound(f"rules version {new_version}: the run is no longer running")
        return receipt

    def unfinished(self) -> list[Run]:
        return self._runs.unfinished()

    def _fence(self) -> int | None:
        """The erasure generation, read fresh (before anything is weighed)."""
        if self._markers is None:
            return None
        self._markers.invalidate()
        self._markers.any()
        return self._markers.fence()

    def _forgotten(self, row: IngressRow) -> bool:
        assert self._markers is not None
        forgotten = self._markers.forgotten_at(row.user_id)
        return forgotten is not None and row.occurred_at <= forgotten

    def _compensate(self, run: Run) -> dict[str, Any]:
        first = run.since.astimezone(UTC).date()
        old = self._rules.version(run.old_version)
        new = self._rules.version(run.new_version)
        assert old is not None and new is not None
        # 1. the erasure generation, before anything is read or weighed
        fence = self._fence()
        # 2. where the new version took effect in each shard: what is at or before it was
        #    weighed under older versions (fixed now for shards that have not noted one)
        upto = self._starts.version_starts(run.new_version, self._shards)
        self._crash_hook("bounded")
        end = self._clock().astimezone(UTC).date() + timedelta(days=1)
        self._dry.period(first, end - timedelta(days=1))  # raises PeriodNotRetained
        skip = None if self._markers is None or not self._markers.any() else self._forgotten
        comparison = self._dry.compare(
            new[0], first, end, current=old[0], summaries=True, upto=upto, skip=skip
        )
        adjustment_id = compensation_id(run.new_version)
        receipt: dict[str, Any] = {
            "new_version": run.new_version,
            "old_version": run.old_version,
            "state": DONE,
            "period": {"from": first.isoformat(), "until": run.until.isoformat()},
            "events": comparison.events,
            "members_compared": len(comparison.members),
            "members_compensated": 0,
            "applied_now": 0,
            "replayed": 0,
            "erased_members": 0,
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
            result = self._accounts.compensate(
                user_id, adjustment_id, currency, points, reason, SOURCE, fence
            )
            self._crash_hook("compensated")
            if result is None:  # being erased, or erased since the fence: not revived
                receipt["erased_members"] += 1
                continue
            applied_c, applied_p, replayed = result
            short_c, short_p = applied_c - currency, applied_p - points
            if not self._runs.put_explanation(
                self._explanation(run, first, member, (currency, points), (applied_c, applied_p))
            ):  # erased after its adjustment: the erasure took both
                receipt["erased_members"] += 1
                continue
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
