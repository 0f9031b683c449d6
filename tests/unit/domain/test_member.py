from datetime import UTC, datetime
from typing import Any
from uuid import uuid5

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.application.pending import award_id_for
from loyalty.domain.errors import (
    AdjustmentConflict,
    DomainError,
    InsufficientFunds,
    InvalidAmount,
    InvalidRules,
    MemberNotFound,
    OrderConflict,
    OrderNotFound,
    RefundConflict,
    RefundExceedsOrder,
)
from loyalty.domain.expiry import CurrencyExpiry
from loyalty.domain.member import (
    NAMESPACE,
    Adjustment,
    Member,
    account_events,
    award_position,
    replay,
    scoped_key,
)
from loyalty.domain.ranks import Rank, RankLadder

USER = "user-7f3a9c"
LADDER = RankLadder(
    (
        Rank("bronze", 0, ("member_prices",)),
        Rank("silver", 1000, ("member_prices", "free_shipping")),
        Rank("gold", 5000, ("member_prices", "free_shipping", "priority_support")),
    )
)


def names(events: Any) -> list[str]:
    return [type(e).__name__ for e in events]


def new_member(currency: int = 0, rank_points: int = 0) -> Member:
    member = Member(user_id=USER)
    if currency or rank_points:
        member.award("seed", currency, rank_points, 1, 1, LADDER)
    member.collect_events()
    return member


# ------------------------------------------------------------------------- ids


def test_member_id_is_uuid5_of_user_id_and_deterministic() -> None:
    assert Member(user_id=USER).id == uuid5(NAMESPACE, USER) == Member.create_id(USER)
    assert Member(user_id=USER).id == Member(user_id=USER).id
    assert Member.create_id("someone-else") != Member.create_id(USER)


def test_new_member_is_created_empty() -> None:
    member = Member(user_id=USER)
    assert (member.user_id, member.currency, member.rank_points) == (USER, 0, 0)
    assert member.rank is None
    assert names(member.collect_events()) == ["Created"]


# ----------------------------------------------------------------------- award


def test_award_credits_currency_rank_points_and_lifetime() -> None:
    member = new_member()
    assert member.award("w1", 30, 40, 3, 2, LADDER) is True
    assert (member.currency, member.rank_points, member.lifetime_currency) == (30, 40, 30)
    awarded = member.collect_events()[0]
    assert type(awarded).__name__ == "Awarded"
    assert (
        awarded.award_id,  # type: ignore[attr-defined]
        awarded.currency,  # type: ignore[attr-defined]
        awarded.rank_points,  # type: ignore[attr-defined]
        awarded.event_count,  # type: ignore[attr-defined]
        awarded.rule_version,  # type: ignore[attr-defined]
    ) == ("w1", 30, 40, 3, 2)


@pytest.mark.parametrize(
    ("awards", "changes"),
    [
        ([0], [(None, "bronze")]),
        ([999], [(None, "bronze")]),
        ([999, 1], [(None, "bronze"), ("bronze", "silver")]),
        ([1000], [(None, "silver")]),
        ([500, 400, 99], [(None, "bronze")]),
        ([1000, 4000, 20000], [(None, "silver"), ("silver", "gold")]),
    ],
)
def test_award_records_rank_changes_at_thresholds(
    awards: list[int], changes: list[tuple[str | None, str | None]]
) -> None:
    member = Member(user_id=USER)
    for i, points in enumerate(awards):
        member.award(f"w{i}", 0, points, 1, 1, LADDER)
    events = [e for stored in member.collect_events() for e in account_events(stored)]
    got = [(e.old, e.new) for e in events if type(e).__name__ == "RankChanged"]
    assert got == changes
    assert member.rank == changes[-1][1] == member.current_rank(LADDER)


def test_award_replay_is_ignored() -> None:
    member = new_member()
    member.award("w1", 10, 10, 1, 1, LADDER)
    member.collect_events()
    assert member.award("w1", 10, 10, 1, 1, LADDER) is False
    assert member.award("w1", 99, 99, 9, 9, LADDER) is False
    assert member.collect_events() == []
    assert (member.currency, member.rank_points) == (10, 10)


@pytest.mark.parametrize(
    "bad",
    [
        {"currency": -1},
        {"rank_points": -1},
        {"currency": True},
        {"currency": 1.5},
        {"rank_points": "5"},
        {"event_count": -1},
    ],
)
def test_award_rejects_invalid_amounts(bad: dict[str, Any]) -> None:
    member = new_member()
    args: dict[str, Any] = {"currency": 1, "rank_points": 1, "event_count": 1, "rule_version": 1}
    args.update(bad)
    with pytest.raises(InvalidAmount):
        member.award("w1", ranks=LADDER, **args)
    assert member.collect_events() == []
    assert member.currency == 0


# ----------------------------------------------------------------------- spend


def test_spend_debits_currency_and_returns_amount() -> None:
    member = new_member(currency=100)
    assert member.spend("o1", 30) == 30
    assert member.currency == 70
    assert member.lifetime_currency == 100
    spent = member.collect_events()
    assert names(spent) == ["Spent"]
    assert (spent[0].order_id, spent[0].amount) == ("o1", 30)  # type: ignore[attr-defined]


def test_spend_replay_with_same_amount_changes_nothing() -> None:
    member = new_member(currency=100)
    member.spend("o1", 30)
    member.collect_events()
    assert member.spend("o1", 30) == 30
    assert member.currency == 70
    assert member.collect_events() == []


def test_spend_same_order_different_amount_conflicts() -> None:
    member = new_member(currency=100)
    member.spend("o1", 30)
    member.collect_events()
    with pytest.raises(OrderConflict) as info:
        member.spend("o1", 31)
    assert info.value.code == "order_conflict"
    assert member.currency == 70
    assert member.collect_events() == []


def test_spend_more_than_balance_is_insufficient_funds() -> None:
    member = new_member(currency=10)
    with pytest.raises(InsufficientFunds) as info:
        member.spend("o1", 11)
    assert info.value.code == "insufficient_funds"
    assert USER not in str(info.value)
    assert member.currency == 10
    assert member.collect_events() == []
    assert member.spend("o2", 10) == 10  # the whole balance is spendable
    assert member.currency == 0


@pytest.mark.parametrize("amount", [0, -1, True, 1.5, "5", None])
def test_spend_rejects_invalid_amounts(amount: Any) -> None:
    member = new_member(currency=100)
    with pytest.raises(InvalidAmount) as info:
        member.spend("o1", amount)
    assert info.value.code == "invalid_amount"
    assert member.currency == 100
    assert member.collect_events() == []


def test_spending_never_lowers_rank() -> None:
    member = new_member(currency=2000, rank_points=1500)
    assert member.rank == "silver"
    member.spend("o1", 2000)
    assert member.currency == 0
    assert (member.rank_points, member.rank, member.current_rank(LADDER)) == (
        1500,
        "silver",
        "silver",
    )
    assert names(member.collect_events()) == ["Spent"]


# ---------------------------------------------------------------------- refund


def test_refund_puts_amount_back_once() -> None:
    member = new_member(currency=100)
    member.spend("o1", 30)
    member.collect_events()
    assert member.refund("o1") == 30
    assert member.currency == 100
    assert names(member.collect_events()) == ["Refunded"]
    assert member.refund("o1") == 30  # replay
    assert member.currency == 100
    assert member.collect_events() == []


def test_refund_of_unknown_order_is_not_found() -> None:
    member = new_member(currency=100)
    with pytest.raises(OrderNotFound) as info:
        member.refund("never-spent")
    assert info.value.code == "order_not_found"
    assert member.currency == 100


def test_spend_replay_after_refund_does_not_debit_again() -> None:
    member = new_member(currency=100)
    member.spend("o1", 30)
    member.refund("o1")
    assert member.spend("o1", 30) == 30
    assert member.currency == 100


def test_partial_refunds_add_up_to_the_order_each_idempotent_by_its_id() -> None:
    """Issue 32 item 6: several partial refunds of one order, each by its own id."""
    member = Member(user_id=USER)
    member.award("seed", 100, 0, 1, 1, LADDER)
    member.spend("o1", 30)
    before = member.collect_events()
    assert member.refund("o1", refund_id="r1", amount=10) == 10
    assert member.currency == 80
    assert member.refund("o1", refund_id="r1", amount=10) == 10  # replay
    assert member.refund("o1", refund_id="r1") == 10  # replay (amount unsaid)
    assert member.currency == 80
    with pytest.raises(RefundConflict):
        member.refund("o1", refund_id="r1", amount=11)
    assert member.refund("o1", refund_id="r2", amount=15) == 15
    with pytest.raises(RefundExceedsOrder) as info:
        member.refund("o1", refund_id="r3", amount=6)
    assert info.value.code == "refund_exceeds_order"
    assert (info.value.refundable, info.value.requested) == (5, 6)
    assert member.refundable(scoped_key(None, "o1")) == 5
    assert scoped_key(None, "o1") not in member.refunded_orders
    assert member.refund("o1") == 5  # the rest, without an id
    assert member.refund("o1") == 5  # its replay
    assert member.currency == 100
    assert scoped_key(None, "o1") in member.refunded_orders
    with pytest.raises(RefundExceedsOrder):
        member.refund("o1", refund_id="r4", amount=1)
    events = member.collect_events()
    assert names(events) == ["Refunded", "Refunded", "Refunded"]
    assert [(e.refund_id, e.amount) for e in events] == [("r1", 10), ("r2", 15), (None, 5)]
    rebuilt = replay([*before, *events])
    assert rebuilt == member
    assert rebuilt.refund("o1", refund_id="r2") == 15 and rebuilt.collect_events() == []


def test_partial_refunds_go_back_into_the_lots_they_came_from_newest_first() -> None:
    member = Member(user_id=USER)
    member.award("a1", 10, 0, 1, 1, LADDER, month="2026-01")
    member.award("a2", 10, 0, 1, 1, LADDER, month="2026-02")
    member.award("a3", 10, 0, 1, 1, LADDER, month="2026-03")
    member.spend("o1", 25)  # 10 of January, 10 of February, 5 of March
    assert member.lots == {"2026-03": 5}
    member.refund("o1", refund_id="r1", amount=7)  # March's 5 first, then 2 of February
    assert member.lots == {"2026-02": 2, "2026-03": 10}
    member.refund("o1", refund_id="r2", amount=12)  # 8 of February, then 4 of January
    assert member.lots == {"2026-01": 4, "2026-02": 10, "2026-03": 10}
    member.refund("o1")  # the rest
    assert member.lots == {"2026-01": 10, "2026-02": 10, "2026-03": 10}
    assert member.currency == 30
    assert replay(member.collect_events()) == member


def test_a_partial_refund_into_an_expired_lot_expires_again_at_once() -> None:
    member = Member(user_id=USER)
    member.award("a1", 10, 0, 1, 1, LADDER, month="2026-01")
    member.award("a2", 10, 0, 1, 1, LADDER, month="2026-02")
    member.spend("o1", 15)  # all of January, 5 of February
    rule, now = CurrencyExpiry(after_months=1), datetime(2026, 3, 1, tzinfo=UTC)  # January's end
    member.refund("o1", None, rule, now, refund_id="r1", amount=5)  # February's: still open
    assert member.lots == {"2026-02": 10} and member.currency == 10
    member.refund("o1", None, rule, now, refund_id="r2", amount=10)  # January's: expires
    assert member.lots == {"2026-02": 10} and member.currency == 10
    assert names(member.collect_events())[-2:] == ["Refunded", "CurrencyExpired"]


def test_refunds_reject_bad_amounts_and_ids() -> None:
    member = new_member(currency=100)
    member.spend("o1", 30)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidAmount):
            member.refund("o1", refund_id="r", amount=bad)  # type: ignore[arg-type]
    with pytest.raises(RefundExceedsOrder):
        member.refund("o1", refund_id="r", amount=31)
    with pytest.raises(OrderNotFound):
        member.refund("o2", refund_id="r", amount=1)
    assert member.currency == 70


# ---------------------------------------------------------------------- adjust


def test_adjust_applies_signed_amounts_and_counts_in_lifetime() -> None:
    member = new_member(currency=100, rank_points=100)
    assert member.adjust("a1", -40, 25, "goodwill", LADDER) is True
    assert (member.currency, member.rank_points, member.lifetime_currency) == (60, 125, 60)
    adjusted = member.collect_events()
    assert names(adjusted) == ["Adjusted"]
    assert adjusted[0].reason == "goodwill"  # type: ignore[attr-defined]


def test_adjust_replay_and_conflict() -> None:
    member = new_member(currency=100)
    member.adjust("a1", 5, 0, "typo", LADDER)
    member.collect_events()
    assert member.adjust("a1", 5, 0, "typo", LADDER) is False
    assert member.collect_events() == []
    for different in [(6, 0, "typo"), (5, 1, "typo"), (5, 0, "other")]:
        with pytest.raises(AdjustmentConflict):
            member.adjust("a1", *different, ranks=LADDER)
    assert member.currency == 105


def test_adjust_below_zero_currency_is_insufficient_funds() -> None:
    member = new_member(currency=10)
    with pytest.raises(InsufficientFunds):
        member.adjust("a1", -11, 0, "chargeback", LADDER)
    assert member.currency == 10
    assert member.adjust("a2", -10, 0, "chargeback", LADDER) is True
    assert member.currency == 0


def test_adjust_below_zero_rank_points_is_invalid() -> None:
    member = new_member(rank_points=10)
    with pytest.raises(InvalidAmount):
        member.adjust("a1", 0, -11, "oops", LADDER)
    assert member.rank_points == 10


@pytest.mark.parametrize("bad", [(True, 0), (0, 1.5), ("1", 0)])
def test_adjust_rejects_non_integers(bad: tuple[Any, Any]) -> None:
    member = new_member(currency=10)
    with pytest.raises(InvalidAmount):
        member.adjust("a1", bad[0], bad[1], "x", LADDER)
    assert member.collect_events() == []


def test_adjust_can_change_rank_both_ways() -> None:
    member = new_member(rank_points=900)
    member.adjust("up", 0, 100, "promo", LADDER)
    member.adjust("down", 0, -1, "correction", LADDER)
    changes = [(e.old, e.new) for e in member.collect_events() if type(e).__name__ == "RankChanged"]  # type: ignore[attr-defined]
    assert changes == [("bronze", "silver"), ("silver", "bronze")]
    assert member.privileges(LADDER) == ("member_prices",)


# ----------------------------------------------------------------- read models


def test_current_rank_and_privileges_follow_the_given_ladder() -> None:
    member = new_member(rank_points=5000)
    assert member.current_rank(LADDER) == "gold"
    assert "priority_support" in member.privileges(LADDER)
    stricter = RankLadder((Rank("bronze", 0, ("member_prices",)), Rank("silver", 10_000)))
    assert member.current_rank(stricter) == "bronze"
    assert member.privileges(RankLadder(())) == ()


# --------------------------------------------------------------------- replay


def test_rebuilding_from_events_gives_identical_state_and_idempotency() -> None:
    member = Member(user_id=USER)
    member.award("w1", 500, 1200, 4, 1, LADDER)
    member.spend("o1", 100)
    member.spend("o2", 50)
    member.refund("o1")
    member.adjust("a1", -20, 10, "fix", LADDER)
    events = member.collect_events()

    rebuilt = replay(events)

    assert rebuilt == member
    assert (rebuilt.currency, rebuilt.rank_points, rebuilt.lifetime_currency) == (430, 1210, 480)
    assert rebuilt.rank == "silver"
    assert rebuilt.version == len(events)
    # award positions and seen ids are rebuilt too, so replays stay idempotent after a reload
    assert rebuilt.award("w1", 500, 1200, 4, 1, LADDER) is False
    assert rebuilt.spend("o2", 50) == 50
    assert rebuilt.refund("o1") == 100
    assert rebuilt.adjust("a1", -20, 10, "fix", LADDER) is False
    assert rebuilt.collect_events() == []
    with pytest.raises(OrderConflict):
        rebuilt.spend("o2", 51)


def test_event_attributes_are_plain_json_values() -> None:
    member = Member(user_id=USER)
    member.award("w1", 5, 1000, 1, 1, LADDER)
    member.spend("o1", 5)
    member.refund("o1")
    member.adjust("a1", 1, 1, "r", LADDER)
    base = {"originator_id", "originator_version", "timestamp", "originator_topic"}
    for e in member.collect_events():
        for key, value in vars(e).items():
            if key not in base:
                assert value is None or type(value) in (int, str, bool), (type(e).__name__, key)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InsufficientFunds(available=1, requested=2), "insufficient_funds"),
        (OrderConflict(), "order_conflict"),
        (OrderNotFound(), "order_not_found"),
        (AdjustmentConflict(), "adjustment_conflict"),
        (InvalidAmount(), "invalid_amount"),
        (InvalidRules([("rules[0].currency", "must be >= 0")]), "invalid_rules"),
        (MemberNotFound(), "member_not_found"),
    ],
)
def test_domain_errors_have_stable_codes_and_messages(error: DomainError, code: str) -> None:
    assert isinstance(error, DomainError)
    assert error.code == code
    assert str(error) == error.message != ""


# ------------------------------------------------- O(1) award idempotency (v2)


@pytest.mark.parametrize(
    ("shard", "end"), [(0, (0, 1)), (3, (7001, 5)), (1023, (2**62, 2**62)), (15, (0, 0))]
)
def test_pipeline_award_ids_parse_to_their_shard_and_window_end(
    shard: int, end: tuple[int, int]
) -> None:
    assert award_position(award_id_for(shard, end)) == (str(shard), list(end))


@pytest.mark.parametrize(
    "award_id",
    [
        "w1",
        "seed",
        "a-seed",
        "",
        "w3.1",
        "w3.1.2.3",
        "w-1.2.3",
        "w3.-1.2",
        "w03.1.2",  # not canonical: award_id_for never writes it
        "w3.01.2",
        "w3.1.02",
        " w3.1.2",
        "w3.1.2\n",
        "W3.1.2",
        "w\u0663.1.2",  # an Arabic-Indic digit three: int() would accept it
        "w3.1.2x",
        "w1.2.3" + "4" * 30,  # too long to be a position
    ],
)
def test_other_award_ids_are_not_positions_and_are_matched_exactly(award_id: str) -> None:
    assert award_position(award_id) is None
    member = new_member()
    assert member.award(award_id, 1, 1, 1, 1, LADDER) is True
    assert member.award(award_id, 1, 1, 1, 1, LADDER) is False
    assert member.other_award_ids == {award_id} and member.award_positions == {}
    assert member.currency == 1


def test_an_award_at_or_below_the_shards_high_water_is_a_replay() -> None:
    member = new_member()
    assert member.award("w3.10.5", 10, 0, 1, 1, LADDER) is True
    assert member.award("w3.10.5", 10, 0, 1, 1, LADDER) is False  # the same window
    # Below the high-water: under the pipeline's protocol only a replay can be there (a
    # shard's window ends strictly increase), so it is one, seen or not.
    assert member.award("w3.10.4", 10, 0, 1, 1, LADDER) is False
    assert member.award("w3.9.99", 10, 0, 1, 1, LADDER) is False
    assert member.award("w3.10.6", 10, 0, 1, 1, LADDER) is True
    assert member.award("w3.11.0", 10, 0, 1, 1, LADDER) is True  # txid first, then seq
    # another shard's positions are not comparable: kept apart
    assert member.award("w4.1.1", 10, 0, 1, 1, LADDER) is True
    assert member.award("w4.1.1", 10, 0, 1, 1, LADDER) is False
    assert member.award_positions == {"3": [11, 0], "4": [1, 1]}
    assert member.currency == 40
    assert member.has_award("w3.10.6") and not member.has_award("w4.1.2")


def test_award_state_does_not_grow_with_the_number_of_awards() -> None:
    member = Member(user_id=USER)
    for i in range(10_000):
        member.award(award_id_for(5, (1000 + i // 7, i)), 1, 1, 1, 1, LADDER)
    assert member.currency == 10_000
    assert member.award_positions == {"5": [1000 + 9_999 // 7, 9_999]}
    assert member.other_award_ids == set()
    assert replay(member.collect_events()) == member


# A window of one shard: its end position and the amounts the member gets in it.
Window = tuple[int, tuple[int, int], int, int]


@st.composite
def pipeline_histories(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Steps as the pipeline may produce them for one member: new windows of a few shards
    (a shard count change moves the member), each ending past the shard's last end;
    replays of any window already recorded (a crash before the checkpoint moved, any
    earlier one for good measure), with any amounts; and reloads from the stream."""
    ends: dict[int, tuple[int, int]] = {}
    recorded: list[Window] = []
    steps: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(["new", "new", "replay", "reload"]))
        if kind == "replay" and recorded:
            shard, end, _c, _r = draw(st.sampled_from(recorded))
            steps.append(("award", (shard, end, draw(st.integers(0, 9)), draw(st.integers(0, 9)))))
        elif kind == "reload":
            steps.append(("reload", None))
        else:
            shard = draw(st.integers(0, 2))
            txid, seq = ends.get(shard, (0, 0))
            step = draw(st.integers(0, 2))
            end = (
                (txid, seq + draw(st.integers(1, 5)))
                if step == 0
                else (
                    txid + step,
                    draw(st.integers(0, 50)),  # a later transaction: any seq
                )
            )
            ends[shard] = end
            window = (shard, end, draw(st.integers(0, 9)), draw(st.integers(0, 9)))
            recorded.append(window)
            steps.append(("award", window))
    return steps


@settings(max_examples=300, deadline=None)
@given(steps=pipeline_histories())
def test_high_water_idempotency_equals_the_set_of_seen_ids(steps: list[tuple[str, Any]]) -> None:
    member = Member(user_id=USER)
    events: list[Any] = member.collect_events()
    seen: set[str] = set()  # the version-1 rule: every award id ever seen
    expected = [0, 0]
    for kind, window in steps:
        if kind == "reload":
            member = replay(events)
            continue
        shard, end, currency, points = window
        award_id = award_id_for(shard, end)
        new = award_id not in seen
        seen.add(award_id)
        if new:
            expected[0] += currency
            expected[1] += points
        assert member.award(award_id, currency, points, 1, 1, LADDER) is new
        events += member.collect_events()
    assert [member.currency, member.rank_points] == expected
    assert replay(events) == member
    assert all(member.has_award(award_id) for award_id in seen)


# ------------------------------------------------------------ v1 -> v2 state


def test_upcast_v1_state_keeps_every_replay_rule() -> None:
    state: dict[str, Any] = {
        "user_id": USER,
        "award_ids": ["w3.7001.5", "w3.7002.1", "w11.100.9", "seed-1", "w03.1.1"],
        "orders": {"o1": 30},
        "refunded_orders": ["o1"],
        "adjustments": {"adj-1": [7, -50, "goodwill"], "adj-2": (1, 2, "tuple")},
    }
    Member.upcast_v1_v2(state)
    assert state["award_positions"] == {"3": [7002, 1], "11": [100, 9]}
    assert state["other_award_ids"] == {"seed-1", "w03.1.1"}
    assert state["orders"] == {scoped_key(None, "o1"): 30}
    assert state["refunded_orders"] == {scoped_key(None, "o1")}
    assert state["adjustments"] == {
        scoped_key(None, "adj-1"): Adjustment(7, -50, "goodwill"),
        scoped_key(None, "adj-2"): Adjustment(1, 2, "tuple"),
    }
    assert "award_ids" not in state


def _mutables(value: Any) -> list[Any]:
    """Every dict, list and set reachable from ``value`` (inside the member's state)."""
    found: list[Any] = []
    if isinstance(value, dict):
        found.append(value)
        for item in value.values():
            found += _mutables(item)
    elif isinstance(value, (list, set)):
        found.append(value)
        for item in value:
            found += _mutables(item)
    return found


def test_a_deep_copy_shares_nothing_mutable_and_folds_apart() -> None:
    """``copy.deepcopy`` (the member view's and a spend's fold on a copy) copies by the
    state's known shapes: no dict, list or set of the copy is the original's, at any
    depth, and a fold on the copy leaves the original as it was."""
    import copy

    member = Member(user_id=USER)
    member.award(award_id_for(3, (10, 2)), 500, 1200, 4, 1, LADDER, "2026-01", "2026-01-05")
    member.award("legacy-id", 50, 0, 1, 1, LADDER, month="2026-02")
    member.spend("o1", 100)
    member.spend("o2", 50)
    member.refund("o1", refund_id="r1", amount=30)
    member.refund("o2")
    member.adjust("a1", -20, 10, "fix", LADDER)
    member.expire(CurrencyExpiry(after_months=1), datetime(2026, 3, 2, tzinfo=UTC))
    member.collect_events()
    state = vars(member)
    for name in ("award_positions", "other_award_ids", "orders", "refunded_orders"):
        assert state[name], name  # every container has something in it
    for name in ("order_refunds", "adjustments", "order_lots", "rank_days", "expired_lots"):
        assert state[name], name
    clone = copy.deepcopy(member)
    assert clone == member and clone is not member
    theirs = {id(v) for v in _mutables(state)} - {id(state)}
    ours = {id(v) for v in _mutables(vars(clone))} - {id(vars(clone))}
    assert theirs and not theirs & ours
    snapshot = copy.deepcopy(state)  # the generic way, for comparison
    clone.award(award_id_for(3, (11, 0)), 7, 9, 1, 1, LADDER, month="2026-03")
    clone.spend("o3", 5)
    clone.refund("o1", refund_id="r2", amount=1)
    assert vars(member) == snapshot  # the original is untouched
    assert clone.currency != member.currency
