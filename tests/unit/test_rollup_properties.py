"""Property: the activity rollup does not depend on how the stream is cut into windows.
Cells folded window by window (with the daily caps carried across windows, as the
pipeline does) equal the cells of the whole stream, and merged window sketches equal the
sketch of the whole."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.application.commands.rules import parse_rule_set
from loyalty.application.reporting import ActivityFacts
from loyalty.domain import sketch
from loyalty.domain.rules import DEFAULT_RULES_WIRE, Activity, CapCounter, aggregate, exact_sum

RULES = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1)
T0 = datetime(2026, 11, 20, tzinfo=UTC)
KEY = b"k" * 32


events = st.lists(
    st.tuples(
        st.integers(0, 6),  # member
        st.sampled_from(["logged_on", "played_game", "made_purchase", "joined_competition", "x"]),
        st.integers(0, 3 * 24 * 60),  # minutes after T0: three days
        st.sampled_from([{}, {"result": "win"}, {"tier": "premium"}]),
        st.sampled_from(["shop", "app"]),
    ),
    max_size=120,
)


class Sourced:
    """An activity as the ingress log hands it out: with its source."""

    def __init__(self, activity: Activity, source: str) -> None:
        self.user_id = activity.user_id
        self.event_type = activity.event_type
        self.occurred_at = activity.occurred_at
        self.attributes = activity.attributes
        self.source = source


def rows_of(raw: list[tuple[int, str, int, dict[str, str], str]]) -> list[Sourced]:
    return [
        Sourced(Activity(f"u{user}", kind, T0 + timedelta(minutes=minutes), attrs), source)
        for user, kind, minutes, attrs, source in raw
    ]


def folded(windows: list[list[Sourced]]) -> dict[tuple[object, ...], tuple[object, ...]]:
    caps = CapCounter()
    cells: dict[tuple[object, ...], list[object]] = {}
    for window in windows:
        facts = ActivityFacts()
        aggregate(window, RULES, caps, facts)
        caps.mark_saved()
        for key, c in facts.cells.items():
            cell = cells.setdefault(key, [0, 0, Decimal(0), Decimal(0), bytearray(sketch.M)])
            cell[0] += c.events  # type: ignore[operator]
            cell[1] += c.earning_events  # type: ignore[operator]
            cell[2] = exact_sum(cell[2], c.currency)  # type: ignore[arg-type]
            cell[3] = exact_sum(cell[3], c.rank_points)  # type: ignore[arg-type]
            cell[4] = sketch.merge(cell[4], sketch.sketch_of(c.members, KEY))  # type: ignore[arg-type]
    return {k: tuple(v) for k, v in cells.items()}


@settings(max_examples=60, deadline=None)
@given(events, st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_any_cut_into_windows_gives_the_same_rollup(
    raw: list[tuple[int, str, int, dict[str, str], str]], cuts: list[int]
) -> None:
    stream = rows_of(raw)
    windows: list[list[Sourced]] = []
    i = 0
    for size in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        if i >= len(stream):
            break
        windows.append(stream[i : i + size])
        i += size
    whole = folded([stream])
    assert folded(windows) == whole
    assert sum(v[0] for v in whole.values()) == len(stream)  # type: ignore[misc]
