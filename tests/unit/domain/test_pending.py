"""Properties of ``loyalty.domain.pending.accumulate``: how a window's earnings add to
the pending rows and which rows become due (pure: no database, no clock)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty.domain import explain
from loyalty.domain.expiry import month_of
from loyalty.domain.pending import Contribution, Held, PendingRow, accumulate
from loyalty.domain.rules import exact_sum

USERS = ("ann", "bob", "cy")
MONTHS = ("2026-01", "2026-02", "2026-03")
T0 = datetime(2026, 2, 10, 12, tzinfo=UTC)
INFINITE = Decimal("Infinity")

# exact decimals far beyond the default context's 28 digits: a rounded sum shows
amount = st.builds(lambda n, e: Decimal(n).scaleb(-e), st.integers(0, 10**34), st.integers(0, 34))


def _summary(version: int, events: int, currency: Decimal, points: Decimal) -> explain.Summary:
    return {
        "rule_versions": [version],
        "types": {
            "t": {
                "known": True,
                "events": events,
                "multipliers": [],
                "currency": f"{currency:f}",
                "rank_points": f"{points:f}",
            }
        },
    }


@st.composite
def contributions(draw: st.DrawFn, user: str, version: int = 1) -> Contribution:
    if draw(st.integers(0, 5)) == 0:  # capped or unknown events only
        n = draw(st.integers(1, 9))
        return Contribution(
            user, Decimal(0), Decimal(0), n, version, _summary(version, n, Decimal(0), Decimal(0))
        )
    months = draw(st.dictionaries(st.sampled_from(MONTHS), amount, min_size=1, max_size=3))
    currency = exact_sum(*months.values())
    points = draw(amount)
    count = draw(st.integers(1, 50))
    return Contribution(
        user,
        currency,
        points,
        count,
        version,
        _summary(version, count, currency, points),
        months if draw(st.booleans()) else None,
    )


@st.composite
def windows(draw: st.DrawFn, version: int = 1) -> list[Contribution]:
    users = draw(st.lists(st.sampled_from(USERS), min_size=1, max_size=3, unique=True))
    return [draw(contributions(u, version)) for u in users]


@st.composite
def held_rows(draw: st.DrawFn, users: Sequence[str] = USERS) -> dict[str, Held]:
    found: dict[str, Held] = {}
    for user in users:
        if not draw(st.booleans()):
            continue
        months = draw(st.dictionaries(st.sampled_from(MONTHS), amount, max_size=3))
        currency = exact_sum(*months.values())
        points = draw(amount)
        count = draw(st.integers(1, 50))
        version = draw(st.integers(1, 2))
        need = draw(st.one_of(st.none(), amount, st.just(INFINITE)))
        row = PendingRow(
            user,
            0,
            currency,
            points,
            count,
            version,
            (5, 1),
            T0 - timedelta(days=draw(st.integers(0, 60))),
            need,
            months if draw(st.booleans()) else None,  # a row stored before months were kept
        )
        found[user] = Held(row, _summary(version, count, currency, points))
    return found


def fold(held: Mapping[str, Held], steps: Sequence[Sequence[Contribution]]) -> dict[str, Held]:
    """Windows one after the other, each seeing the rows the one before stored."""
    rows = dict(held)
    for i, window in enumerate(steps):
        result = accumulate(rows, window, 0, (10 + i, 1), T0 + timedelta(minutes=i))
        rows.update({h.row.user_id: h for h in result.rows})
    return rows


def combine(steps: Sequence[Sequence[Contribution]]) -> list[Contribution]:
    """The windows as one window: each member's contributions added exactly."""
    by_user: dict[str, list[Contribution]] = {}
    for window in steps:
        for c in window:
            by_user.setdefault(c.user_id, []).append(c)
    out = []
    for user, cs in by_user.items():
        summaries = [c.summary for c in cs if c.summary is not None]
        summary = None
        for s in summaries:
            summary = explain.merge(summary, s)
        months: dict[str, Decimal] = {}
        for c in cs:  # a contribution without months counts in the month of the row
            for month, value in (c.months or {month_of(T0): c.currency}).items():
                months[month] = exact_sum(months.get(month, Decimal(0)), value)
        out.append(
            Contribution(
                user,
                exact_sum(*(c.currency for c in cs)),
                exact_sum(*(c.rank_points for c in cs)),
                sum(c.event_count for c in cs),
                cs[-1].rule_version,
                summary,
                months,
            )
        )
    return out


def _months(row: PendingRow) -> dict[str, Decimal]:
    """As stored and read: months of nothing are left out; a row without months counts
    in the month of its ``since``."""
    months = row.months if row.months is not None else {month_of(row.since): row.currency}
    return {m: v for m, v in months.items() if v}


def _key(h: Held) -> tuple[object, ...]:
    r = h.row
    totals = None if h.summary is None else explain.totals(h.summary)
    return (
        r.currency,
        r.rank_points,
        r.event_count,
        r.rule_version,
        r.rank_need,
        _months(r),
        totals,
    )


@given(held=held_rows(), steps=st.lists(windows(), min_size=1, max_size=6))
def test_windows_one_by_one_equal_their_exact_sum_at_once(
    held: dict[str, Held], steps: list[list[Contribution]]
) -> None:
    """Associativity where it holds: from rows that exist (one per contributing member),
    any split of the same contributions into windows stores the same amounts, counts,
    months and explanation totals; only the revision (the last window's end) differs."""
    for user in USERS:  # every member holds a row, all since T0's month
        if user not in held:
            held[user] = Held(
                PendingRow(user, 0, Decimal(0), Decimal(0), 1, 1, (5, 1), T0, None, {}),
                _summary(1, 1, Decimal(0), Decimal(0)),
            )
        else:
            held[user] = Held(
                PendingRow(**{**_fields(held[user].row), "since": T0}), held[user].summary
            )
    one_by_one = fold(held, steps)
    at_once = fold(held, [combine(steps)])
    assert {u: _key(h) for u, h in one_by_one.items()} == {u: _key(h) for u, h in at_once.items()}


def _fields(row: PendingRow) -> dict[str, object]:
    return {name: getattr(row, name) for name in PendingRow.__slots__}


@given(steps=st.lists(windows(), min_size=1, max_size=6))
def test_nothing_is_lost_or_doubled_and_a_window_of_nothing_starts_no_row(
    steps: list[list[Contribution]],
) -> None:
    """From no rows: a member's row holds exactly the sum of everything contributed, and
    the counts of every window since the first that earned something (a window of
    capped or unknown events only, before any row, has no row to be counted in)."""
    rows = fold({}, steps)
    for user in USERS:
        mine = [c for w in steps for c in w if c.user_id == user]
        earning = [i for i, c in enumerate(mine) if c.currency or c.rank_points]
        if not earning:
            assert user not in rows
            continue
        row = rows[user].row
        assert row.currency == exact_sum(*(c.currency for c in mine))
        assert row.rank_points == exact_sum(*(c.rank_points for c in mine))
        assert row.event_count == sum(c.event_count for c in mine[earning[0] :])
        assert exact_sum(*_months(row).values()) == row.currency
        first = next(
            i for i, w in enumerate(steps) for c in w if c.user_id == user and c is mine[earning[0]]
        )
        assert row.since == T0 + timedelta(minutes=first)  # the window that started it


@given(held=held_rows(), window=windows(version=2))
def test_months_and_the_explanation_add_up_to_the_amounts(
    held: dict[str, Held], window: list[Contribution]
) -> None:
    """The months sum to the currency (what ``Member.award`` requires) and the
    explanation's totals to the amounts, when the held row's and the window's do."""
    result = accumulate(held, window, 3, (40, 2), T0)
    for h in result.rows:
        assert exact_sum(*(h.row.months or {}).values()) == h.row.currency
        assert h.summary is not None
        assert explain.totals(h.summary) == (h.row.currency, h.row.rank_points)


@given(held=held_rows(), window=windows(version=2))
def test_what_becomes_due_and_which_rank_need_is_kept(
    held: dict[str, Held], window: list[Contribution]
) -> None:
    """A new row is due at once (rank need unknown); a held row keeps its need only under
    the rules version it was noted under, and is due when its need is unknown or its
    rank points reach it; every stored row takes the window's end as its revision."""
    end, now = (40, 2), T0 + timedelta(days=1)
    result = accumulate(held, window, 3, end, now)
    stored = {h.row.user_id: h.row for h in result.rows}
    for c in window:
        before = held.get(c.user_id)
        if before is None and not (c.currency or c.rank_points):
            assert c.user_id not in stored
            continue
        row = stored[c.user_id]
        assert (row.upto, row.shard, row.rule_version) == (end, 3, c.rule_version)
        if before is None:
            assert (row.since, row.rank_need, row.event_count) == (now, None, c.event_count)
        else:
            assert row.since == before.row.since
            kept = before.row.rank_need if before.row.rule_version == c.rule_version else None
            assert row.rank_need == kept
    due = {r.user_id for r in result.settle}
    assert due == {
        u for u, r in stored.items() if r.rank_need is None or r.rank_points >= r.rank_need
    }
    assert all(r == stored[r.user_id] for r in result.settle)
    assert [r.user_id for r in result.settle] == [u for u in stored if u in due]


def test_a_row_with_no_rank_above_is_never_due_by_its_points() -> None:
    row = PendingRow("ann", 0, Decimal(1), Decimal(10**30), 1, 1, (1, 1), T0, INFINITE, None)
    more = Contribution("ann", Decimal("0.5"), Decimal(5), 1, 1, None, {"2026-02": Decimal("0.5")})
    result = accumulate({"ann": Held(row)}, [more], 0, (2, 1), T0)
    assert result.settle == () and result.rows[0].row.rank_need == INFINITE
    assert result.rows[0].row.months == {"2026-02": Decimal("1.5")}  # the old row's month too


def test_one_window_gives_one_contribution_per_member() -> None:
    c = Contribution("ann", Decimal(1), Decimal(1), 1, 1)
    with pytest.raises(ValueError, match="two contributions"):
        accumulate({}, [c, c], 0, (1, 1), T0)
