"""The pure explanation (issue 20): a member's summaries, merged window by window as the
pipeline merges pending earnings, equal the summary of all its events at once, and add up
exactly to the aggregation's exact sums; the amounts identity holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.application.commands.rules import parse_rule_set
from loyalty.domain import explain
from loyalty.domain.rules import Activity, CapCounter, aggregate

RULES = parse_rule_set(
    {
        "rules": [
            {"event_type": "a", "currency": "0.3", "rank_points": 1, "daily_cap": 3},
            {
                "event_type": "b",
                "currency": "1.25",
                "rank_points": "0.5",
                "multipliers": [
                    {"when": {"win": True}, "factor": "1.5"},
                    {"when": {"tier": "gold"}, "factor": "3"},
                ],
            },
        ],
        "ranks": [{"name": "x", "min_rank_points": 0}],
    },
    7,
)
BASE = datetime(2026, 11, 20, tzinfo=UTC)
ATTRS = [{}, {"win": True}, {"win": 1}, {"tier": "gold"}, {"win": True, "tier": "gold"}]

events = st.lists(
    st.tuples(
        st.sampled_from(["u1", "u2"]),
        st.sampled_from(["a", "b", "zzz"]),
        st.integers(0, 2),
        st.integers(0, len(ATTRS) - 1),
    ),
    max_size=60,
)


def activities(raw: list[tuple[str, str, int, int]]) -> list[Activity]:
    return [
        Activity(u, t, BASE + timedelta(days=d, minutes=i), ATTRS[a])
        for i, (u, t, d, a) in enumerate(raw)
    ]


@settings(max_examples=150, deadline=None)
@given(raw=events, cuts=st.lists(st.integers(0, 60), max_size=5))
def test_merged_window_summaries_equal_the_whole_and_sum_exactly(
    raw: list[tuple[str, str, int, int]], cuts: list[int]
) -> None:
    rows = activities(raw)
    whole = aggregate(rows, RULES, CapCounter(), explain=True)
    bounds = sorted({0, len(rows), *(c for c in cuts if c <= len(rows))})
    caps = CapCounter()
    merged: dict[str, explain.Summary] = {}
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        window = aggregate(rows[lo:hi], RULES, caps, explain=True)
        for user, draft in window.drafts.items():
            summary = explain.summarize(draft, RULES)
            merged[user] = explain.merge(merged.get(user), summary)
    for user, draft in whole.drafts.items():
        want = explain.summarize(draft, RULES)
        got = merged[user]
        assert explain.totals(got) == (draft.exact_currency, draft.exact_rank_points)
        assert got["types"].keys() == want["types"].keys()
        for event_type, line in want["types"].items():
            other = got["types"][event_type]
            assert other["events"] == line["events"]
            assert other.get("capped", {}) == line.get("capped", {})
            assert Decimal(other.get("currency", "0")) == Decimal(line.get("currency", "0"))
            count = {m["factor"]: m["events"] for m in other.get("multipliers", [])}
            assert count == {m["factor"]: m["events"] for m in line.get("multipliers", [])}


def test_a_summary_names_caps_multipliers_and_unknown_types() -> None:
    rows = activities(
        [("u", "a", 0, 0)] * 5
        + [("u", "b", 0, 1), ("u", "b", 0, 4), ("u", "b", 0, 2)]
        + [("u", "zzz", 0, 0)]
    )
    draft = aggregate(rows, RULES, CapCounter(), explain=True).drafts["u"]
    summary = explain.summarize(draft, RULES)
    assert summary["rule_versions"] == [7]
    assert summary["types"]["a"] == {
        "known": True,
        "events": 5,
        "capped": {"3": 2},
        "multipliers": [],
        "currency": "0.9",
        "rank_points": "3",
    }
    b = summary["types"]["b"]
    # win=1 is not win=True (type-aware): it earns the base only
    assert b["multipliers"] == [
        {"when": {"win": True}, "factor": "1.5", "events": 2},
        {"when": {"tier": "gold"}, "factor": "3", "events": 1},
    ]
    assert Decimal(b["currency"]) == Decimal("1.25") * Decimal("1.5") * 4 + Decimal("1.25")
    assert summary["types"]["zzz"] == {"known": False, "events": 1}


def test_the_amounts_identity() -> None:
    recorded = explain.amounts(Decimal("37.5"), 37, Decimal("0.75"))
    assert recorded.carried_in == Decimal("0.25")  # 37 + 0.75 - 37.5
    pending = explain.pending_amounts(Decimal("37.5"), Decimal("0.75"))
    assert (pending.credited, pending.carried_out) == (38, Decimal("0.25"))
    assert pending.to_wire()["carried_out"] == "0.25"
