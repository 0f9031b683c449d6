"""Reporting that outlives retention: daily rollups, the daily report, the export.

Two kinds of facts are rolled up per UTC day and kept forever (small: no user id, one
row per day x source x event type x shard, and one per day):

- **activity** (from the pipeline, in the transaction of the window's checkpoint
  compare-and-set, so a window is counted exactly once): per day x source x event type,
  the events, the events that earned (a non-zero weight: not an unknown type, not beyond
  a daily cap, not weighed zero), a sketch of the distinct members
  (``loyalty.domain.sketch``), and the currency and rank points *awarded*: the exact
  decimal sum of the events' weights, before any rounding. What members are *credited*
  is whole units of their running exact total (see the pending earnings), so the credited
  figures below differ from the awarded ones by the fractions still carried on accounts
  and by earnings still pending.
- **accounts** (from the member projection, with its tracking position in one
  transaction): per day of the event's timestamp, whole currency and rank points
  credited by awards, currency spent, refunded, adjusted (and rank points adjusted),
  expired (``Member.CurrencyExpired``), forgotten (balances erased by forget-me), new
  accounts, and the changes of the members with a balance and of the members per rank.
  End-of-day levels (outstanding currency, members with a balance, members per rank)
  are the running sums of those changes over every day up to the day.

The projection counts an event in the rollups only once: a rollup watermark (its own
tracking position, which a read-model rebuild leaves alone) says which events were
already counted, so a rebuild re-projects balances without counting history twice (and
without losing the days of members forgotten since).

The report (:func:`daily_report`) reads only the rollups, so a day reads the same after
retention dropped its activity. The export (:func:`export`) hands the rollups and the
account events to a sink (Parquet files, ``adapters/parquet_export.py``), each member as
an HMAC-SHA256 pseudonym under the deployment's export key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

from loyalty.domain.rules import ActivityLike, decimal_to_wire, exact_add, exact_sum
from loyalty.domain.sketch import estimate, merge

ActivityKey = tuple[date, str, str]
"""(UTC day, source, event type)"""

EXPIRED_EVENT = "CurrencyExpired"
"""The class name of ``loyalty.domain.member:Member.CurrencyExpired`` (``amount: int``)."""

_ZERO = Decimal(0)


# ------------------------------------------------------------------ activity (pipeline)


@dataclass(slots=True)
class ActivityCell:
    """One day x source x event type of one window (or one stored rollup row)."""

    events: int = 0
    earning_events: int = 0
    currency: Decimal = _ZERO
    rank_points: Decimal = _ZERO
    members: set[str] = field(default_factory=set)
    """The window's members, in memory only: stored as a keyed sketch, never as ids."""


class ActivityFacts:
    """A window's activity rollup: given to ``aggregate`` as its observer, then written
    by the checkpoint's commit."""

    def __init__(self) -> None:
        self.cells: dict[ActivityKey, ActivityCell] = {}

    def weighed(self, activity: ActivityLike, currency: Decimal, rank_points: Decimal) -> None:
        occurred = activity.occurred_at
        day = occurred.date() if occurred.tzinfo is UTC else occurred.astimezone(UTC).date()
        key = (day, getattr(activity, "source", ""), activity.event_type)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = ActivityCell()
        cell.events += 1
        cell.members.add(activity.user_id)
        if currency or rank_points:
            cell.earning_events += 1
            cell.currency = exact_add(cell.currency, currency)
            cell.rank_points = exact_add(cell.rank_points, rank_points)

    def __bool__(self) -> bool:
        return bool(self.cells)


# ------------------------------------------------------------------ accounts (projection)


@dataclass(frozen=True, slots=True)
class AccountFact:
    """One account event as the rollups see it."""

    position: int
    day: date
    member_id: str
    kind: str
    currency: int = 0
    """The signed change of spendable currency."""
    rank_points: int = 0
    rank_old: str | None = None
    rank_new: str | None = None


def account_facts(pairs: Sequence[tuple[int, Any]]) -> list[AccountFact]:
    """Map ``(notification id, domain event)`` pairs to facts (by the event's class)."""
    out: list[AccountFact] = []
    for position, event in pairs:
        name = type(event).__name__
        at: datetime = event.timestamp
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        day = at.date()
        member = str(event.originator_id)
        if name == "Created":
            out.append(AccountFact(position, day, member, "created"))
        elif name == "Awarded":
            out.append(
                AccountFact(position, day, member, "awarded", event.currency, event.rank_points)
            )
        elif name == "Spent":
            out.append(AccountFact(position, day, member, "spent", -event.amount))
        elif name == "Refunded":
            out.append(AccountFact(position, day, member, "refunded", event.amount))
        elif name == "Adjusted":
            out.append(
                AccountFact(position, day, member, "adjusted", event.currency, event.rank_points)
            )
        elif name == EXPIRED_EVENT:
            out.append(AccountFact(position, day, member, "expired", -int(event.amount)))
        elif name == "RankChanged":
            out.append(
                AccountFact(position, day, member, "rank", rank_old=event.old, rank_new=event.new)
            )
    return out


@dataclass(slots=True)
class AccountDay:
    """Changes of one day's account figures (added to the stored row)."""

    currency_credited: int = 0
    rank_points_credited: int = 0
    currency_spent: int = 0
    currency_refunded: int = 0
    currency_adjusted: int = 0
    rank_points_adjusted: int = 0
    currency_expired: int = 0
    currency_forgotten: int = 0
    new_members: int = 0
    members_change: int = 0
    """New accounts minus forgotten ones."""
    holders_change: int = 0
    """Change of the number of members with a balance above zero."""
    outstanding_change: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    """Change of the number of members per rank."""

    COUNTERS = (
        "currency_credited",
        "rank_points_credited",
        "currency_spent",
        "currency_refunded",
        "currency_adjusted",
        "rank_points_adjusted",
        "currency_expired",
        "currency_forgotten",
        "new_members",
        "members_change",
        "holders_change",
        "outstanding_change",
    )

    def add(self, other: AccountDay) -> None:
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for rank, n in other.ranks.items():
            self.ranks[rank] = self.ranks.get(rank, 0) + n


def fold_accounts(
    facts: Iterable[AccountFact], balances: Mapping[str, int]
) -> dict[date, AccountDay]:
    """Per day, the changes ``facts`` make, in order; ``balances`` is each member's
    projected currency before the first fact (missing: 0, a new account)."""
    days: dict[date, AccountDay] = {}
    current = dict(balances)
    for f in facts:
        d = days.get(f.day)
        if d is None:
            d = days[f.day] = AccountDay()
        before = current.get(f.member_id, 0)
        after = before + f.currency
        current[f.member_id] = after
        d.outstanding_change += f.currency
        d.holders_change += (after > 0) - (before > 0)
        if f.kind == "created":
            d.new_members += 1
            d.members_change += 1
        elif f.kind == "awarded":
            d.currency_credited += f.currency
            d.rank_points_credited += f.rank_points
        elif f.kind == "spent":
            d.currency_spent -= f.currency
        elif f.kind == "refunded":
            d.currency_refunded += f.currency
        elif f.kind == "adjusted":
            d.currency_adjusted += f.currency
            d.rank_points_adjusted += f.rank_points
        elif f.kind == "expired":
            d.currency_expired -= f.currency
        elif f.kind == "rank":
            if f.rank_old is not None:
                d.ranks[f.rank_old] = d.ranks.get(f.rank_old, 0) - 1
            if f.rank_new is not None:
                d.ranks[f.rank_new] = d.ranks.get(f.rank_new, 0) + 1
    return days


def forgotten_day(balance: int, rank: str | None) -> AccountDay:
    """What forget-me takes out of the day's figures: the member's balance, account,
    holding and rank (no id: only counts)."""
    d = AccountDay(
        currency_forgotten=balance,
        outstanding_change=-balance,
        members_change=-1,
        holders_change=-1 if balance > 0 else 0,
    )
    if rank is not None:
        d.ranks[rank] = -1
    return d


# ------------------------------------------------------------------ the report


@dataclass(frozen=True, slots=True)
class ActivityRow:
    source: str
    event_type: str
    events: int
    earning_events: int
    members: int
    """Distinct members (a HyperLogLog estimate, ~1.6 % standard error)."""
    currency_awarded: Decimal
    rank_points_awarded: Decimal

    def to_wire(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "event_type": self.event_type,
            "events": self.events,
            "earning_events": self.earning_events,
            "members": self.members,
            "currency_awarded": decimal_to_wire(self.currency_awarded),
            "rank_points_awarded": decimal_to_wire(self.rank_points_awarded),
        }


DAY_COLUMNS: tuple[str, ...] = (
    "day",
    "events",
    "earning_events",
    "active_members",
    "currency_awarded",
    "rank_points_awarded",
    "currency_credited",
    "rank_points_credited",
    "currency_spent",
    "currency_refunded",
    "currency_adjusted",
    "rank_points_adjusted",
    "currency_expired",
    "currency_forgotten",
    "new_members",
    "members",
    "members_with_balance",
    "outstanding_currency",
)
"""The scalar figures of a day's report, in the order of its JSON (``DayReport.to_wire``
adds ``members_per_rank`` and ``activity``): the export's and the console's columns."""

FIGURE_LABELS: dict[str, str] = {
    "day": "Day (UTC)",
    "events": "Events",
    "earning_events": "Events that earned",
    "active_members": "Active members",
    "currency_awarded": "Currency awarded (exact weights)",
    "rank_points_awarded": "Rank points awarded (exact weights)",
    "currency_credited": "Currency credited (whole units)",
    "rank_points_credited": "Rank points credited (whole units)",
    "currency_spent": "Currency spent",
    "currency_refunded": "Currency refunded",
    "currency_adjusted": "Currency adjusted",
    "rank_points_adjusted": "Rank points adjusted",
    "currency_expired": "Currency expired",
    "currency_forgotten": "Currency forgotten (forget-me)",
    "new_members": "New members",
    "members": "Members",
    "members_with_balance": "Members with a balance",
    "outstanding_currency": "Outstanding currency (end of day)",
}
"""One label per figure of the report, the same wherever it is shown: the console's
dashboard and reports page, ``loyalty report`` and the API's schema. *Awarded* is the
exact sum of the events' weights (the pipeline's view); *credited* is what reached
members' balances in whole units (it trails *awarded* by the fractions still carried and
the earnings still pending)."""

TODAY_FIGURES: tuple[str, ...] = (
    "events",
    "currency_awarded",
    "currency_credited",
    "currency_spent",
    "currency_refunded",
    "currency_adjusted",
    "outstanding_currency",
)
"""The figures of today the console's dashboard shows (from :func:`daily_report`, the
report's own source: the dashboard and ``GET /v1/reports/daily`` cannot disagree)."""


def today_report(reader: RollupReader, today: date) -> dict[str, Any]:
    """Today's report as the API answers it (``GET /v1/reports/daily?from=today&to=today``)."""
    return daily_report(reader, today, today)[0].to_wire()


@dataclass(frozen=True, slots=True)
class DayReport:
    day: date
    activity: list[ActivityRow]
    active_members: int
    """Distinct members with any activity that day (the day's sketches merged)."""
    changes: AccountDay
    outstanding_currency: int
    members: int
    members_with_balance: int
    members_per_rank: dict[str, int]

    @property
    def events(self) -> int:
        return sum(r.events for r in self.activity)

    @property
    def earning_events(self) -> int:
        return sum(r.earning_events for r in self.activity)

    @property
    def currency_awarded(self) -> Decimal:
        return exact_sum(*(r.currency_awarded for r in self.activity))

    @property
    def rank_points_awarded(self) -> Decimal:
        return exact_sum(*(r.rank_points_awarded for r in self.activity))

    def to_wire(self) -> dict[str, Any]:
        c = self.changes
        return {
            "day": self.day.isoformat(),
            "events": self.events,
            "earning_events": self.earning_events,
            "active_members": self.active_members,
            "currency_awarded": decimal_to_wire(self.currency_awarded),
            "rank_points_awarded": decimal_to_wire(self.rank_points_awarded),
            "currency_credited": c.currency_credited,
            "rank_points_credited": c.rank_points_credited,
            "currency_spent": c.currency_spent,
            "currency_refunded": c.currency_refunded,
            "currency_adjusted": c.currency_adjusted,
            "rank_points_adjusted": c.rank_points_adjusted,
            "currency_expired": c.currency_expired,
            "currency_forgotten": c.currency_forgotten,
            "new_members": c.new_members,
            "members": self.members,
            "members_with_balance": self.members_with_balance,
            "members_per_rank": dict(sorted(self.members_per_rank.items())),
            "outstanding_currency": self.outstanding_currency,
            "activity": [r.to_wire() for r in self.activity],
        }


@dataclass(frozen=True, slots=True)
class StoredActivity:
    """A stored activity rollup row (one shard's share of a day x source x type)."""

    day: date
    source: str
    event_type: str
    events: int
    earning_events: int
    currency: Decimal
    rank_points: Decimal
    sketch: bytes | bytearray


class RollupReader(Protocol):
    def activity(self, first: date, last: date) -> list[StoredActivity]: ...
    def accounts(self, last: date) -> dict[date, AccountDay]:
        """Every stored account day up to ``last`` (the levels need all of them)."""
        ...


MAX_REPORT_DAYS = 3660


class ReportRangeError(ValueError):
    pass


def check_range(first: date, last: date) -> None:
    if last < first:
        raise ReportRangeError("`to` is before `from`")
    if (last - first).days >= MAX_REPORT_DAYS:
        raise ReportRangeError(f"at most {MAX_REPORT_DAYS} days per report")


def daily_report(reader: RollupReader, first: date, last: date) -> list[DayReport]:
    """One entry per day from ``first`` to ``last`` (inclusive), from the rollups alone:
    the same before and after retention dropped the days' activity."""
    check_range(first, last)
    cells: dict[ActivityKey, StoredActivity] = {}
    sketches: dict[ActivityKey, bytearray] = {}
    for row in reader.activity(first, last):
        key = (row.day, row.source, row.event_type)
        found = cells.get(key)
        if found is None:
            cells[key] = row
            sketches[key] = bytearray(row.sketch)
        else:
            cells[key] = StoredActivity(
                row.day,
                row.source,
                row.event_type,
                found.events + row.events,
                found.earning_events + row.earning_events,
                exact_sum(found.currency, row.currency),
                exact_sum(found.rank_points, row.rank_points),
                b"",
            )
            sketches[key] = merge(sketches[key], row.sketch)
    accounts = reader.accounts(last)
    level = AccountDay()
    for day in sorted(d for d in accounts if d < first):
        level.add(accounts[day])
    out: list[DayReport] = []
    day = first
    while day <= last:
        changes = accounts.get(day, AccountDay())
        level.add(changes)
        keys = sorted(k for k in cells if k[0] == day)
        rows = [
            ActivityRow(
                k[1],
                k[2],
                cells[k].events,
                cells[k].earning_events,
                estimate(sketches[k]),
                cells[k].currency,
                cells[k].rank_points,
            )
            for k in keys
        ]
        day_sketch = bytearray()
        for k in keys:
            day_sketch = sketches[k] if not day_sketch else merge(day_sketch, sketches[k])
        out.append(
            DayReport(
                day=day,
                activity=rows,
                active_members=estimate(day_sketch) if day_sketch else 0,
                changes=changes,
                outstanding_currency=level.outstanding_change,
                members=level.members_change,
                members_with_balance=level.holders_change,
                members_per_rank={r: n for r, n in level.ranks.items() if n},
            )
        )
        day += timedelta(days=1)
    return out


# ------------------------------------------------------------------ the export


def pseudonym(key: bytes, user_id: str) -> str:
    """The keyed pseudonym of a member in exports: HMAC-SHA256 with the deployment's
    export key (hex). Stable across exports (joins work), not reversible without it."""
    return hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()


DATASETS = ("activity", "accounts", "account_events")


class ExportRefused(Exception):
    """Account events are not exported without the deployment's pseudonym key."""


class AccountEventRow(NamedTuple):
    """One exported account event: the member only as a keyed pseudonym (a tuple: a
    million of them are made per export)."""

    position: int
    day: date
    member: str
    version: int
    type: str
    at: datetime
    currency: int
    """The signed change of spendable currency."""
    rank_points: int
    ref: str | None
    source: str | None


class NotificationLog(Protocol):
    """The event store's notification log, decoded (``Members``' recorder and mapper)."""

    def read(self, after: int, limit: int) -> tuple[Sequence[tuple[int, Any]], int]:
        """Up to ``limit`` (notification id, domain event) pairs after ``after``, and the
        last notification id read (``after`` when there is none)."""
        ...


class ExportSink(Protocol):
    def complete(self, dataset: str, day: date) -> bool:
        """Whether the day's file of ``dataset`` exists (it appears whole, or not at all)."""
        ...

    def write_rows(self, dataset: str, day: date, rows: Sequence[Mapping[str, Any]]) -> int:
        """Write the day's file of ``dataset`` atomically; returns its bytes."""
        ...

    def write_events(self, days: set[date], rows: Iterable[AccountEventRow]) -> dict[date, int]:
        """Write one account-event file per day of ``days`` atomically, streaming ``rows``
        (of those days, in any day order) into them; returns the rows per day."""
        ...


_Change = tuple[int, int, str | None]
"""(signed currency change, rank points, reference) of one account event"""

_CHANGES: dict[str, Callable[[Any], _Change]] = {
    "Created": lambda e: (0, 0, None),
    "Awarded": lambda e: (e.currency, e.rank_points, e.award_id),
    "Spent": lambda e: (-e.amount, 0, e.order_id),
    "Refunded": lambda e: (e.amount, 0, e.order_id),
    "Adjusted": lambda e: (e.currency, e.rank_points, e.adjustment_id),
    "RankChanged": lambda e: (0, 0, e.new),
    EXPIRED_EVENT: lambda e: (-int(e.amount), 0, getattr(e, "lot", None)),
}


def _unknown(_event: Any) -> _Change:
    return (0, 0, None)


def account_event_rows(
    log: NotificationLog, key: bytes, wanted: set[date], batch: int = 5000
) -> Iterator[AccountEventRow]:
    """The account events of the ``wanted`` days, in log order, each member as
    :func:`pseudonym`. The whole log is read (a member's ``Created`` names its user id);
    a forgotten member's stream is gone from the log, so none of its events is exported."""
    users: dict[Any, str] = {}  # stream id -> pseudonym
    after = 0
    while True:
        page, last = log.read(after, batch)
        if last <= after:
            return
        after = last
        for position, event in page:
            member = event.originator_id
            cls = type(event)
            name = cls.__name__
            if name == "Created":
                users[member] = pseudonym(key, event.user_id)
            at: datetime = event.timestamp
            if at.tzinfo is not UTC:
                at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
            day = at.date()
            if day not in wanted:
                continue
            who = users.get(member)
            if who is None:  # a stream without its Created (an orphan): no one to name
                continue
            currency, points, ref = _CHANGES.get(name, _unknown)(event)
            yield AccountEventRow(
                position,
                day,
                who,
                event.originator_version,
                name,
                at,
                currency,
                points,
                ref,
                getattr(event, "source", None),
            )


@dataclass(slots=True)
class ExportResult:
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DATASETS, 0))
    """Files written per dataset."""
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DATASETS, 0))
    """Days left alone per dataset: final, and already exported."""
    events: int = 0
    bytes: int = 0


def export(
    reader: RollupReader,
    log: NotificationLog,
    sink: ExportSink,
    first: date,
    last: date,
    *,
    key: bytes | None,
    final_before: date,
    events: bool = True,
) -> ExportResult:
    """Export the rollups (and, with ``events``, the account events) of ``first`` ..
    ``last`` as one file per dataset and day. A day before ``final_before`` can no longer
    change (no ingress is accepted for it, no account event is stamped with it): once its
    file exists it is skipped, so an interrupted export resumes where it stopped. Later
    days are written again each time."""
    check_range(first, last)
    if events and key is None:
        raise ExportRefused(
            "account events are exported only with a pseudonym key "
            "(LOYALTY_EXPORT_PSEUDONYM_KEY); export the rollups alone with --rollups-only"
        )
    result = ExportResult()

    def todo(dataset: str, day: date) -> bool:
        if day < final_before and sink.complete(dataset, day):
            result.skipped[dataset] += 1
            return False
        return True

    for day_report in daily_report(reader, first, last):
        day = day_report.day
        if todo("activity", day):
            rows = [
                r.to_wire()
                | {
                    "currency_awarded": r.currency_awarded,
                    "rank_points_awarded": r.rank_points_awarded,
                }
                for r in day_report.activity
            ]
            result.bytes += sink.write_rows("activity", day, rows)
            result.written["activity"] += 1
        if todo("accounts", day):
            wire = day_report.to_wire()
            del wire["activity"], wire["day"]
            wire["currency_awarded"] = day_report.currency_awarded
            wire["rank_points_awarded"] = day_report.rank_points_awarded
            result.bytes += sink.write_rows("accounts", day, [wire])
            result.written["accounts"] += 1
    if not events:
        return result
    assert key is not None
    wanted = set()
    day = first
    while day <= last:
        if todo("account_events", day):
            wanted.add(day)
        day += timedelta(days=1)
    if not wanted:
        return result
    counts = sink.write_events(wanted, account_event_rows(log, key, wanted))
    result.written["account_events"] += len(counts)
    result.events = sum(counts.values())
    return result


class MembersLog:
    """:class:`NotificationLog` over the Members application (its recorder and mapper),
    passing over SQLite's forget-me tombstone rows."""

    TOMBSTONE = "loyalty.erasure:Tombstone"

    def __init__(self, members: Any) -> None:
        self._members = members

    def read(self, after: int, limit: int) -> tuple[Sequence[tuple[int, Any]], int]:
        recorder = self._members.recorder
        head = int(recorder.max_notification_id() or 0)
        if head <= after:
            return [], after
        notifications = recorder.select_notifications(
            after, limit, stop=head, inclusive_of_start=False
        )
        if not notifications:
            return [], after
        mapper = self._members.mapper
        pairs = [
            (n.id, mapper.to_domain_event(n)) for n in notifications if n.topic != self.TOMBSTONE
        ]
        return pairs, int(notifications[-1].id)
