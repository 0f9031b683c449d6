"""The account rollup's arithmetic: per day, what each account event changes, including
the levels at the end of a day (outstanding currency, members with a balance, members
per rank) and the expiry of #19 (`Member.CurrencyExpired`, matched by its class name)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from loyalty.application.reporting import (
    DAY_COLUMNS,
    AccountDay,
    AccountFact,
    DayReport,
    StoredActivity,
    account_facts,
    daily_report,
    fold_accounts,
    forgotten_day,
)

D1, D2, D3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)


def at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


@dataclass
class Created:
    originator_id: str
    timestamp: datetime
    user_id: str = "x"


@dataclass
class Awarded:
    originator_id: str
    timestamp: datetime
    currency: int
    rank_points: int


@dataclass
class Spent:
    originator_id: str
    timestamp: datetime
    amount: int


@dataclass
class CurrencyExpired:  # the shape helper #19 adds to loyalty.domain.member
    originator_id: str
    timestamp: datetime
    amount: int
    lot: str


@dataclass
class RankChanged:
    originator_id: str
    timestamp: datetime
    old: str | None
    new: str | None


def test_a_day_s_changes_and_the_levels_they_add_up_to() -> None:
    events: list[Any] = [
        Created("a", at(D1)),
        Awarded("a", at(D1), 10, 10),
        RankChanged("a", at(D1), None, "bronze"),
        Created("b", at(D1)),
        Awarded("b", at(D1), 5, 5),
        RankChanged("b", at(D1), None, "bronze"),
        Spent("a", at(D2), 10),  # a's balance reaches 0: one holder fewer
        RankChanged("b", at(D2), "bronze", "silver"),
        CurrencyExpired("b", at(D3), 2, "2026-01"),
    ]
    facts = account_facts(list(enumerate(events, start=1)))
    days = fold_accounts(facts, {})
    assert days[D1].currency_credited == 15 and days[D1].new_members == 2
    assert days[D1].holders_change == 2 and days[D1].ranks == {"bronze": 2}
    assert days[D2].currency_spent == 10 and days[D2].holders_change == -1
    assert days[D2].ranks == {"bronze": -1, "silver": 1}
    assert days[D3].currency_expired == 2 and days[D3].outstanding_change == -2

    class Reader:
        def activity(self, first: date, last: date) -> list[StoredActivity]:
            return []

        def accounts(self, last: date) -> dict[date, AccountDay]:
            return {d: v for d, v in days.items() if d <= last}

    report = daily_report(Reader(), D2, D3)  # D1 is before the range: a level, not a row
    assert [r.outstanding_currency for r in report] == [5, 3]
    assert [r.members_with_balance for r in report] == [1, 1]
    assert report[0].members_per_rank == {"bronze": 1, "silver": 1}
    assert report[1].members == 2 and report[1].changes.currency_expired == 2
    assert report[0].currency_awarded == Decimal(0)


def test_the_balances_before_the_batch_decide_the_holders() -> None:
    fact = AccountFact(9, D1, "a", "spent", -4)
    assert fold_accounts([fact], {"a": 4})[D1].holders_change == -1
    assert fold_accounts([fact], {"a": 10})[D1].holders_change == 0


def test_forget_me_takes_balance_account_and_rank_out() -> None:
    d = forgotten_day(7, "gold")
    assert (d.outstanding_change, d.currency_forgotten, d.members_change) == (-7, 7, -1)
    assert d.holders_change == -1 and d.ranks == {"gold": -1}
    assert forgotten_day(0, None).holders_change == 0


def test_the_export_and_console_columns_are_the_report_s_own() -> None:
    """A figure added to the daily report reaches the CSV and Parquet exports too."""
    day = DayReport(date(2026, 11, 1), [], 0, AccountDay(), 0, 0, 0, {})
    wire = [
        k for k in day.to_wire() if k not in ("members_per_rank", "activity", "unweighed_types")
    ]
    assert tuple(wire) == DAY_COLUMNS
