"""The expiry job: expire currency lots that are due, member by member, as of a time.

It reads only members the expiry index (``member_lots``, kept by the projection) lists
with a lot due at ``as_of`` — never every member — in key order ``(lot, user id)``, and
for each one loads the account, records its pending earnings (so currency still pending
from a due month expires too) and calls :meth:`Member.expire`, which decides on the
aggregate: one ``CurrencyExpired`` per lot with currency left, nothing for a lot already
expired. Each member is saved on its own (a small transaction: a spend of another member
never waits for it; a spend of the same member conflicts on the stream version and one
of the two retries from a fresh read), and only then are its due index rows deleted.

Hence exactly once per lot, whatever crashes: a run killed after a save and before the
index delete finds the member again next time and the aggregate has nothing left to
expire; two runs at once (the lease normally prevents it) cannot both append, the stream
version decides. The lease (a database lock, asked of the database before each batch)
only saves duplicate work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from eventsourcing.persistence import IntegrityError

from loyalty.application.accounts import Accounts, with_retry
from loyalty.application.jobs import JobMetrics, PeriodicJob
from loyalty.application.pending import PendingRow
from loyalty.domain.errors import MemberNotFound
from loyalty.domain.expiry import CurrencyExpiry
from loyalty.domain.member import Member
from loyalty.domain.rules import RuleSet

log = logging.getLogger(__name__)

DueRow = tuple[str, str]
"""(lot, user id) of the expiry index, in its key order."""


class LotIndex(Protocol):
    """The expiry index (implemented by ``loyalty.adapters.expiry_store``)."""

    def due(self, last_lot: str, after: DueRow | None, limit: int) -> list[DueRow]: ...
    def count_due(self, last_lot: str) -> int: ...
    def ranked(self, keep: str | None, after: str | None, limit: int) -> list[str]: ...
    def remove(self, rows: Sequence[DueRow]) -> None: ...


class JobLease(Protocol):
    def hold(self) -> AbstractContextManager[Callable[[], bool] | None]:
        """Take the lease for a block: yields a check that asks the database whether it
        is still held, or None when another process holds it."""
        ...


class ExpiryMetrics(Protocol):
    def currency_expired(self, lots: int, amount: int) -> None: ...


@dataclass
class ExpiryReport:
    as_of: datetime
    rule: CurrencyExpiry | None
    members: int = 0
    """Members read (their index rows were due)."""
    lots: int = 0
    """``CurrencyExpired`` events recorded."""
    amount: int = 0
    skipped: bool = False
    """Another process holds the lease."""
    interrupted: bool = False
    """The lease was lost mid-run (the rest is done by the next run)."""
    seconds: float = 0.0
    expired: list[tuple[str, str, int]] = field(default_factory=list)
    """(user id, lot, amount) of the first expiries (at most 100, for the report)."""
    qualification: bool = False
    """Ranks have a qualification period: ranked members were re-qualified."""
    ranked_members: int = 0
    rank_changes: int = 0
    rank_downgrades: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of.isoformat(),
            "enabled": self.rule is not None,
            "members": self.members,
            "lots_expired": self.lots,
            "amount_expired": self.amount,
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "qualification": self.qualification,
            "ranked_members": self.ranked_members,
            "rank_changes": self.rank_changes,
            "rank_downgrades": self.rank_downgrades,
        }

    def summary(self) -> str:
        if self.rule is None:
            text = f"expiry as of {self.as_of.isoformat()}: currency expiry is off"
        else:
            text = (
                f"expiry as of {self.as_of.isoformat()}: {self.members:,} members read, "
                f"{self.lots:,} lots expired, {self.amount:,} currency, {self.seconds:.2f}s"
            )
        if self.qualification:
            text += (
                f"; ranks re-qualified: {self.ranked_members:,} ranked members, "
                f"{self.rank_changes:,} changes ({self.rank_downgrades:,} down)"
            )
        return text


Progress = Callable[[int, int], None]


class Expiry:
    """Expire due lots as of a time (the worker's clock, or ``loyalty expiry run
    --as-of``)."""

    def __init__(
        self,
        accounts: Accounts,
        index: LotIndex,
        rules: Callable[[], RuleSet],
        lease: JobLease,
        *,
        batch: int = 500,
        group: int = 100,
        metrics: ExpiryMetrics | None = None,
    ) -> None:
        self._accounts = accounts
        self._index = index
        self._rules = rules
        self._lease = lease
        self._batch = batch
        self._group = group
        self._metrics = metrics

    def run(self, as_of: datetime, progress: Progress | None = None) -> ExpiryReport:
        rule_set = self._rules()
        rule = rule_set.currency_expiry
        report = ExpiryReport(
            as_of=as_of, rule=rule, qualification=rule_set.ranks.qualification is not None
        )
        if rule is None and not report.qualification:
            return report
        started = time.monotonic()
        with self._lease.hold() as still_held:
            if still_held is None:
                report.skipped = True
                log.info("expiry skipped: another process holds the lease")
                return report
            if rule is not None:
                self._expire(rule_set, rule, as_of, still_held, report, progress)
            if report.qualification and not report.interrupted:
                self._requalify(rule_set, as_of, still_held, report)
        report.seconds = time.monotonic() - started
        if self._metrics is not None and report.lots:
            self._metrics.currency_expired(report.lots, report.amount)
        return report

    def preview(self, as_of: datetime) -> ExpiryReport:
        """What :meth:`run` would expire as of ``as_of`` (``loyalty expiry run
        --dry-run``): ``members`` with currency due, its ``lots`` and ``amount``, from the
        recorded lots (pending earnings not yet recorded are not counted). Reads only:
        no lease, no event, the index left as it is."""
        rule_set = self._rules()
        rule = rule_set.currency_expiry
        report = ExpiryReport(as_of=as_of, rule=rule)
        if rule is None:
            return report
        started = time.monotonic()
        last_lot = rule.last_expired_lot(as_of)
        after: DueRow | None = None
        seen: set[str] = set()
        while rows := self._index.due(last_lot, after, self._batch):
            after = rows[-1]
            for user_id in dict.fromkeys(u for lot, u in rows if _is_due(rule, lot, as_of)):
                if user_id in seen:
                    continue
                seen.add(user_id)
                try:
                    lots = self._accounts.get(user_id).lots
                except MemberNotFound:  # erased since the index row was written
                    continue
                due = [(lot, n) for lot, n in sorted(lots.items()) if n > 0]
                due = [(lot, n) for lot, n in due if _is_due(rule, lot, as_of)]
                if due:
                    self._count(report, user_id, due)
        report.seconds = time.monotonic() - started
        return report

    def _expire(
        self,
        rule_set: RuleSet,
        rule: CurrencyExpiry,
        as_of: datetime,
        still_held: Callable[[], bool],
        report: ExpiryReport,
        progress: Progress | None,
    ) -> None:
        last_lot = rule.last_expired_lot(as_of)
        total = self._index.count_due(last_lot) if progress is not None else 0
        after: DueRow | None = None
        done = 0
        while True:
            if not still_held():
                report.interrupted = True
                log.warning("expiry lease lost; the next run finishes")
                break
            rows = self._index.due(last_lot, after, self._batch)
            if not rows:
                break
            after = rows[-1]
            due = [(lot, user) for lot, user in rows if _is_due(rule, lot, as_of)]
            users = list(dict.fromkeys(user for _, user in due))
            # Decide on the store's state, never on a cached copy: a copy that shows
            # nothing to expire is not saved, so no version check would catch it stale.
            for user_id in users:
                self._accounts.evict(user_id)
            self._accounts.prefetch(users)  # one read for the page's accounts
            pending = self._accounts.pending.load(users) if self._accounts.pending else {}
            for start in range(0, len(users), self._group):
                group = users[start : start + self._group]
                try:
                    self._expire_group(group, pending, rule_set, as_of, report)
                except IntegrityError:
                    # a member of the group changed meanwhile (a spend) or is being
                    # erased: one at a time, each from a fresh read
                    for user_id in group:
                        self._expire_member(user_id, rule_set, as_of, report)
            self._index.remove(due)
            done += len(rows)
            if progress is not None:
                progress(done, max(total, done))

    def _requalify(
        self,
        rule_set: RuleSet,
        as_of: datetime,
        still_held: Callable[[], bool],
        report: ExpiryReport,
    ) -> None:
        """Re-evaluate every ranked member's rank as of ``as_of`` (a rank whose
        threshold is 0 cannot be lost: its holders are not read)."""
        ladder = rule_set.ranks
        lowest = ladder.ranks[0] if ladder.ranks else None
        keep = lowest.name if lowest is not None and lowest.min_rank_points == 0 else None
        after: str | None = None
        accounts = self._accounts
        while True:
            if not still_held():
                report.interrupted = True
                log.warning("expiry lease lost; the next run finishes")
                return
            users = self._index.ranked(keep, after, self._batch)
            if not users:
                return
            after = users[-1]
            for user_id in users:
                accounts.evict(user_id)  # decide on the store's state (see _expire)

                def action(user_id: str = user_id) -> tuple[str | None, str | None] | None:
                    try:
                        member = accounts.get(user_id)
                    except MemberNotFound:
                        return None
                    row = accounts.pending_of(user_id)
                    recorded = accounts.fold(member, row, ladder)
                    old = member.rank
                    changed = member.requalify(ladder, as_of)
                    if changed or recorded:
                        try:
                            accounts.save(
                                member,
                                fence=accounts.fence(),
                                consumed=(row,) if recorded and row else (),
                            )
                        except Exception:
                            accounts.evict(user_id)
                            raise
                    return (old, member.rank) if changed else None

                change = with_retry(action, what="requalification")
                report.ranked_members += 1
                if change is not None:
                    report.rank_changes += 1
                    if ladder.order(change[1]) < ladder.order(change[0]):
                        report.rank_downgrades += 1

    def _expire_group(
        self,
        group: Sequence[str],
        pending: Mapping[str, PendingRow],
        rule_set: RuleSet,
        as_of: datetime,
        report: ExpiryReport,
    ) -> None:
        """Expire a group of members in one save (one transaction; the group is small,
        so a spend waits at most one group's insert). Any conflict fails the whole save
        and nothing of it is stored. 100 a group, not 50: each transaction's commit and
        round trips cost about 1.5 ms, and halving their number took 14 % off a run of
        100k members (15 -> 12.8 s) for about 1 ms on the p99 of spends made meanwhile
        (15.3 -> 16.5 ms: the ``currency_expiry`` benchmark)."""
        accounts = self._accounts
        changed: list[Member] = []
        consumed: list[PendingRow] = []
        results: list[tuple[str, list[tuple[str, int]]]] = []
        for user_id in group:
            try:
                member = accounts.get(user_id)
            except MemberNotFound:  # erased since the index row was written
                continue
            row = pending.get(user_id)
            recorded = accounts.fold(member, row, rule_set.ranks)
            expired = member.expire(rule_set.currency_expiry, as_of)
            if expired or recorded:
                changed.append(member)
                if recorded and row is not None:
                    consumed.append(row)
            results.append((user_id, expired))
        if changed:
            try:
                accounts.save(*changed, fence=accounts.fence(), consumed=consumed)
            except Exception:
                for member in changed:  # the cached copies are ahead of the store
                    accounts.evict(member.user_id)
                raise
        for user_id, expired in results:
            self._count(report, user_id, expired)

    @staticmethod
    def _count(report: ExpiryReport, user_id: str, expired: list[tuple[str, int]]) -> None:
        report.members += 1
        for lot, amount in expired:
            report.lots += 1
            report.amount += amount
            if len(report.expired) < 100:
                report.expired.append((user_id, lot, amount))

    def _expire_member(
        self, user_id: str, rule_set: RuleSet, as_of: datetime, report: ExpiryReport
    ) -> None:
        rule = rule_set.currency_expiry
        accounts = self._accounts

        def action() -> list[tuple[str, int]]:
            try:
                member = accounts.get(user_id)
            except MemberNotFound:  # erased since the index row was written
                return []
            row = accounts.pending_of(user_id)
            recorded = accounts.fold(member, row, rule_set.ranks)
            expired = member.expire(rule, as_of)
            if expired or recorded:
                try:
                    accounts.save(
                        member, fence=accounts.fence(), consumed=(row,) if recorded and row else ()
                    )
                except Exception:
                    accounts.evict(user_id)  # the cached copy is ahead of the store
                    raise
            return expired

        self._count(report, user_id, with_retry(action, what="expiry"))


def _is_due(rule: CurrencyExpiry | None, lot: str, as_of: datetime) -> bool:
    when = None if rule is None else rule.expires_at(lot)
    return when is not None and when <= as_of


class ExpiryJob(PeriodicJob):
    """Runs expiry periodically (in the worker) with the clock on the job runner; a
    failed run is retried with backoff, never ending the thread."""

    def __init__(
        self,
        expiry: Expiry,
        *,
        interval_seconds: float,
        clock: Callable[[], datetime] | None = None,
        first_delay_seconds: float | None = None,
        metrics: JobMetrics | None = None,
    ) -> None:
        super().__init__(
            "expiry",
            interval_seconds=interval_seconds,
            first_delay_seconds=first_delay_seconds,
            metrics=metrics,
            logger=log,
        )
        self._expiry = expiry
        self._clock = clock or (lambda: datetime.now(UTC))

    def _once(self) -> None:
        report = self._expiry.run(self._clock())
        if report.rule is not None or report.qualification:
            log.info("%s", report.summary())
