"""A new member is one stored event (issue 30): ``Member.Enrolled`` stands for the
account's ``Created``, first ``Awarded`` and the ``RankChanged`` from no rank, and folds
to the same state as those three events."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from eventsourcing.domain import Aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.application.commands.rules import parse_rule_set
from loyalty.domain.expiry import CurrencyExpiry
from loyalty.domain.member import Member, account_events, replay
from loyalty.domain.ranks import Rank, RankLadder
from loyalty.domain.rules import DEFAULT_RULES_WIRE, exact_sum

LIFETIME = RankLadder((Rank("bronze", 0), Rank("silver", 100), Rank("gold", 1000)))
UNRANKED_START = RankLadder((Rank("silver", 100), Rank("gold", 1000)))


def qualified() -> RankLadder:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rank_qualification"] = {"period": {"rolling_days": 365}}
    return parse_rule_set(wire, 2).ranks


LADDERS = [LIFETIME, UNRANKED_START, qualified(), RankLadder(())]
BOOKKEEPING = {"originator_version", "timestamp"}
STATE_SKIP = {"_created_on", "_modified_on", "_pending_events"}

amounts = st.decimals(min_value=0, max_value=3000, places=3, allow_nan=False)
months = st.sampled_from(["2026-10", "2026-11", "2026-12"])


def fields(event: Any) -> tuple[str, dict[str, Any]]:
    return type(event).__name__, {k: v for k, v in vars(event).items() if k not in BOOKKEEPING}


def state(member: Member) -> dict[str, Any]:
    return {k: v for k, v in vars(member).items() if k not in STATE_SKIP}


def twins(command: Any) -> tuple[Member, list[Any], list[Any]]:
    """The same commands on two new members: the events collected (as stored) and the
    aggregate's own events one by one (as every version before issue 30 stored them)."""
    stored, before = Member(user_id="neo"), Member(user_id="neo")
    command(stored)
    command(before)
    return stored, list(stored.collect_events()), list(Aggregate.collect_events(before))


@settings(max_examples=200, deadline=None)
@given(
    ladder=st.sampled_from(LADDERS),
    earned=st.dictionaries(months, amounts, max_size=3),
    points=amounts,
    day=st.sampled_from(["2026-12-04", None]),
    then=st.sampled_from(["nothing", "award", "adjust"]),
)
def test_a_new_member_is_one_event_that_folds_like_the_three(
    ladder: RankLadder,
    earned: dict[str, Decimal],
    points: Decimal,
    day: str | None,
    then: str,
) -> None:
    currency = exact_sum(*earned.values()) if earned else Decimal(0)
    by_month = earned or None

    def command(member: Member) -> None:
        assert member.record_pending(
            "w3.10.2", currency, points, 7, 2, ladder, months=by_month, on=day
        )
        if then == "award":
            member.award("w3.11.0", 5, 5, 1, 2, ladder, on=day)
        elif then == "adjust":
            member.adjust("a1", 3, 2, "welcome", ladder, on=day)

    member, stored, before = twins(command)
    names = [type(e).__name__ for e in before]
    assert names[:2] == ["Created", "Awarded"]
    opening = 3 if names[2:3] == ["RankChanged"] and before[2].old is None else 2
    # one stored event opens the account, the rest follow it renumbered
    assert type(stored[0]) is Member.Enrolled
    assert len(stored) == len(before) - opening + 1
    assert [e.originator_version for e in stored] == list(range(1, len(stored) + 1))
    assert member.version == len(stored)
    # read as the events it stands for: the same events with the same fields
    parts = [e for s in stored for e in account_events(s)]
    assert [fields(e) for e in parts] == [fields(e) for e in before]
    # replayed: the same state as the three events (and as the member that made them)
    assert state(replay(stored)) == state(member)
    assert {**state(replay(before)), "_version": member.version} == state(member)


def test_a_first_award_in_an_expired_lot_keeps_its_expiry_after_the_enrolment() -> None:
    def command(member: Member) -> None:
        member.record_pending(
            "w1.1.0",
            Decimal(40),
            Decimal(40),
            1,
            1,
            LIFETIME,
            months={"2020-01": Decimal(40)},
            expiry=CurrencyExpiry(after_months=12, effective_from="2000-01"),
            as_of=datetime(2026, 12, 4, tzinfo=UTC),
            on="2026-12-04",
        )

    member, stored, before = twins(command)
    assert [type(e).__name__ for e in before] == [
        "Created",
        "Awarded",
        "CurrencyExpired",
        "RankChanged",
    ]
    # the rank change follows the expiry, not the award: it stays its own event
    assert [type(e).__name__ for e in stored] == ["Enrolled", "CurrencyExpired", "RankChanged"]
    assert [fields(e) for s in stored for e in account_events(s)] == [fields(e) for e in before]
    assert member.currency == 0 and member.rank == "bronze"
    assert state(replay(stored)) == state(member)


def test_what_does_not_open_with_an_award_is_stored_as_it_was() -> None:
    member = Member(user_id="adj")
    member.adjust("a1", 10, 150, "welcome", LIFETIME)
    assert [type(e).__name__ for e in member.collect_events()] == [
        "Created",
        "Adjusted",
        "RankChanged",
    ]
    later = Member(user_id="later")
    later.collect_events()
    later.award("w1.1.0", 5, 150, 1, 1, LIFETIME)
    assert [type(e).__name__ for e in later.collect_events()] == ["Awarded", "RankChanged"]
    alone = Member(user_id="alone")
    assert [type(e).__name__ for e in alone.collect_events()] == ["Created"]
