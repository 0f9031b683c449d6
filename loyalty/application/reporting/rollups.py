"""The daily rollups' facts: activity per day x source x event type (from the pipeline)
and account changes per day (from the member projection); see the package's docstring."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from loyalty.domain.member import account_events
from loyalty.domain.rules import ActivityLike, exact_add

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
    for position, stored in pairs:
        for event in account_events(stored):  # an Enrolled: its Created, Awarded, ...
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
                    AccountFact(
                        position, day, member, "adjusted", event.currency, event.rank_points
                    )
                )
            elif name == EXPIRED_EVENT:
                out.append(AccountFact(position, day, member, "expired", -int(event.amount)))
            elif name == "RankChanged":
                out.append(
                    AccountFact(
                        position, day, member, "rank", rank_old=event.old, rank_new=event.new
                    )
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
