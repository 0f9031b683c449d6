"""#27: the domain refuses what no entrypoint may store (``loyalty.domain.limits``), the
same bounds as the API's models, whoever calls the command methods."""

from __future__ import annotations

import pytest

from loyalty.application.commands.accounts import AdjustmentRequest, SpendRequest
from loyalty.domain.errors import InvalidAmount
from loyalty.domain.limits import MAX_AMOUNT, MAX_BALANCE, MAX_ID_LENGTH
from loyalty.domain.member import Member
from loyalty.domain.ranks import Rank, RankLadder

LADDER = RankLadder((Rank("bronze", 0),))


def funded() -> Member:
    member = Member(user_id="alice")
    member.adjust("seed", 100, 0, "seed", LADDER)
    return member


@pytest.mark.parametrize(
    ("currency", "rank_points"),
    [(MAX_AMOUNT + 1, 0), (0, -MAX_AMOUNT - 1), (2**63, 0), (0, 10**30), (True, 0), (1.0, 0)],
)
def test_adjust_refuses_amounts_beyond_the_apis(currency: object, rank_points: object) -> None:
    member = funded()
    with pytest.raises(InvalidAmount):
        member.adjust("a", currency, rank_points, "why", LADDER)  # type: ignore[arg-type]
    assert list(member.adjustments) == ['[null,"seed"]']


@pytest.mark.parametrize(
    ("adjustment_id", "reason"),
    [("a\x00", "why"), ("a\x1f", "why"), ("", "why"), ("a" * (MAX_ID_LENGTH + 1), "why")]
    + [("a", ""), ("a", "why\x7f"), ("a", "x" * 257), ("a", 5)],
)
def test_adjust_refuses_ids_and_reasons_the_api_refuses(adjustment_id: str, reason: str) -> None:
    with pytest.raises(InvalidAmount):
        funded().adjust(adjustment_id, 1, 0, reason, LADDER)


def test_spend_and_refund_refuse_what_the_api_refuses() -> None:
    member = funded()
    for order_id, amount in [("o\x00", 1), ("", 1), ("o", 0), ("o", MAX_AMOUNT + 1)]:
        with pytest.raises(InvalidAmount):
            member.spend(order_id, amount)
    with pytest.raises(InvalidAmount):
        member.refund("o\n")


def test_a_balance_never_grows_beyond_what_the_read_models_hold() -> None:
    member = Member(user_id="bob")
    for i in range(MAX_BALANCE // MAX_AMOUNT):
        member.adjust(f"a{i}", 0, MAX_AMOUNT, "r", LADDER)
    with pytest.raises(InvalidAmount):
        member.adjust("over", 0, 1, "r", LADDER)


def test_the_api_models_publish_the_same_bounds() -> None:
    schema = AdjustmentRequest.model_json_schema()["properties"]
    assert schema["currency"]["maximum"] == MAX_AMOUNT
    assert schema["currency"]["minimum"] == -MAX_AMOUNT
    assert schema["adjustment_id"]["maxLength"] == MAX_ID_LENGTH
    assert SpendRequest.model_json_schema()["properties"]["amount"]["maximum"] == MAX_AMOUNT


def test_a_version_2_refund_loads_with_no_operator() -> None:
    """``Refunded`` version 3 records ``by`` (#27); a stored version 2 loads with None."""
    from dataclasses import replace

    from eventsourcing.application import Application

    app: Application = Application()
    member = funded()
    member.spend("o", 5, "shop")
    member.refund("o", "shop", by="ops")
    app.save(member)
    stored = [e for e in app.recorder.select_events(member.id) if e.topic.endswith("Refunded")]
    decoded = app.mapper.transcoder.decode(stored[0].state)
    assert decoded["by"] == "ops" and decoded["class_version"] == 4
    assert decoded["refund_id"] is None
    del decoded["refund_id"]
    decoded["class_version"] = 3  # #32 item 6: version 4 records the refund id
    v3 = app.mapper.to_domain_event(replace(stored[0], state=app.mapper.transcoder.encode(decoded)))
    assert (v3.by, v3.refund_id, v3.amount) == ("ops", None, 5)  # type: ignore[attr-defined]
    del decoded["by"]
    decoded["class_version"] = 2
    old = replace(stored[0], state=app.mapper.transcoder.encode(decoded))
    event = app.mapper.to_domain_event(old)
    assert (event.source, event.by, event.amount) == ("shop", None, 5)  # type: ignore[attr-defined]
    assert event.refund_id is None  # type: ignore[attr-defined]
