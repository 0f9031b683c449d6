"""The Member aggregate: a member's loyalty account, event-sourced.

Public command methods validate and derive; private ``@event`` methods only
assign state, so replaying stored events is cheap and deterministic. Every
command is idempotent by its id (award_id, order_id, adjustment_id).

Order ids and adjustment ids are scoped by *source* (the name of the API key that
sent the command, as ingest de-duplication is): shop A's ``o-77`` and shop B's
``o-77`` are two orders, and B can neither replay nor refund A's. Events stored before
sources were recorded (``Spent``, ``Refunded``, ``Adjusted`` version 1) load with
``source = None``: such a legacy id answers every source as before (a replay is still
a replay, never a second charge).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from loyalty.domain.errors import (
    AdjustmentConflict,
    InsufficientFunds,
    InvalidAmount,
    OrderConflict,
    OrderNotFound,
)
from loyalty.domain.ranks import RankLadder, is_int

Scoped = tuple[str | None, str]
"""(source, id): an order or adjustment id within the source that sent it."""

NAMESPACE = UUID("5b0e6c1e-3f43-5c9a-9d0b-6f1d2a7c4e10")
"""Namespace of member ids: ``Member.create_id(user_id) == uuid5(NAMESPACE, user_id)``.
Never change it: every stored stream is addressed by it."""


def _require_int(value: object, *, minimum: int | None, what: str) -> int:
    if not is_int(value):
        raise InvalidAmount(f"{what} must be an integer")
    assert isinstance(value, int)
    if minimum is not None and value < minimum:
        raise InvalidAmount(f"{what} must be >= {minimum}")
    return value


class Member(Aggregate):
    """A member's account: spendable currency, lifetime rank points, rank."""

    @staticmethod
    def create_id(user_id: str) -> UUID:
        """The deterministic aggregate id of ``user_id``."""
        return uuid5(NAMESPACE, user_id)

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.currency = 0
        """Spendable balance; never below zero."""
        self.rank_points = 0
        """Lifetime rank points (awards plus adjustments); never below zero."""
        self.lifetime_currency = 0
        """Currency ever earned: awards plus adjustments (spending excluded)."""
        self.rank: str | None = None
        """The rank name last recorded by a RankChanged event."""
        self.award_ids: set[str] = set()
        self.orders: dict[Scoped, int] = {}
        """Amount per (source, order id); source None: stored before sources were."""
        self.refunded_orders: set[Scoped] = set()
        self.adjustments: dict[Scoped, tuple[int, int, str]] = {}

    # ------------------------------------------------------------ scoped ids

    @staticmethod
    def _scoped(known: Collection[Scoped], source: str | None, id_: str) -> Scoped:
        """The key of ``id_`` from ``source``: its own, a legacy one (no source) if
        only that is known, else its own (new)."""
        own = (source, id_)
        if own not in known and (None, id_) in known:
            return (None, id_)
        return own

    def order_key(self, order_id: str, source: str | None) -> Scoped:
        """The key under which ``source``'s ``order_id`` is (or would be) stored."""
        return self._scoped(self.orders, source, order_id)

    def adjustment_key(self, adjustment_id: str, source: str | None) -> Scoped:
        """The key under which ``source``'s ``adjustment_id`` is (or would be) stored."""
        return self._scoped(self.adjustments, source, adjustment_id)

    # ------------------------------------------------------------------ commands

    def award(
        self,
        award_id: str,
        currency: int,
        rank_points: int,
        event_count: int,
        rule_version: int,
        ranks: RankLadder,
    ) -> bool:
        """Credit an award once per ``award_id``; False (no event) on a replay."""
        if award_id in self.award_ids:
            return False
        _require_int(currency, minimum=0, what="currency")
        _require_int(rank_points, minimum=0, what="rank_points")
        _require_int(event_count, minimum=0, what="event_count")
        _require_int(rule_version, minimum=0, what="rule_version")
        self._awarded(
            award_id=award_id,
            currency=currency,
            rank_points=rank_points,
            event_count=event_count,
            rule_version=rule_version,
        )
        self._record_rank(ranks)
        return True

    def spend(self, order_id: str, amount: int, source: str | None = None) -> int:
        """Debit ``amount`` for ``source``'s ``order_id``; a replay with the same
        amount is a no-op returning the amount."""
        _require_int(amount, minimum=1, what="amount")
        spent = self.orders.get(self.order_key(order_id, source))
        if spent is not None:
            if spent != amount:
                raise OrderConflict()
            return amount
        if self.currency < amount:
            raise InsufficientFunds(available=self.currency, requested=amount)
        self._spent(order_id=order_id, amount=amount, source=source)
        return amount

    def refund(self, order_id: str, source: str | None = None) -> int:
        """Put ``source``'s spent order's amount back, once; returns the amount."""
        key = self.order_key(order_id, source)
        amount = self.orders.get(key)
        if amount is None:
            raise OrderNotFound()
        if key not in self.refunded_orders:
            self._refunded(order_id=order_id, amount=amount, source=key[0])
        return amount

    def adjust(
        self,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        ranks: RankLadder,
        source: str | None = None,
    ) -> bool:
        """Operator correction (may be negative), idempotent by ``source``'s
        ``adjustment_id``; False (no event) on a replay."""
        _require_int(currency, minimum=None, what="currency")
        _require_int(rank_points, minimum=None, what="rank_points")
        if not isinstance(reason, str):
            raise TypeError("reason must be a string")
        previous = self.adjustments.get(self.adjustment_key(adjustment_id, source))
        if previous is not None:
            if previous != (currency, rank_points, reason):
                raise AdjustmentConflict()
            return False
        if self.currency + currency < 0:
            raise InsufficientFunds(available=self.currency, requested=-currency)
        if self.rank_points + rank_points < 0:
            raise InvalidAmount("rank_points would go below zero")
        self._adjusted(
            adjustment_id=adjustment_id,
            currency=currency,
            rank_points=rank_points,
            reason=reason,
            source=source,
        )
        self._record_rank(ranks)
        return True

    # --------------------------------------------------------------------- reads

    def current_rank(self, ranks: RankLadder) -> str | None:
        """The rank name for the lifetime rank points under ``ranks``."""
        rank = ranks.rank_for(self.rank_points)
        return rank.name if rank is not None else None

    def privileges(self, ranks: RankLadder) -> tuple[str, ...]:
        """The privileges of the current rank under ``ranks``."""
        rank = ranks.rank_for(self.rank_points)
        return rank.privileges if rank is not None else ()

    # -------------------------------------------------------------------- events

    def _record_rank(self, ranks: RankLadder) -> None:
        new = self.current_rank(ranks)
        if new != self.rank:
            self._rank_changed(old=self.rank, new=new)

    @event("Awarded")
    def _awarded(
        self,
        award_id: str,
        currency: int,
        rank_points: int,
        event_count: int,
        rule_version: int,
    ) -> None:
        self.award_ids.add(award_id)
        self.currency += currency
        self.lifetime_currency += currency
        self.rank_points += rank_points

    # Version 2 of these events records the source; version 1 (stored before) had none.

    class Spent(Aggregate.Event):
        class_version = 2
        order_id: str
        amount: int
        source: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["source"] = None

    class Refunded(Aggregate.Event):
        class_version = 2
        order_id: str
        amount: int
        source: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["source"] = None

    class Adjusted(Aggregate.Event):
        class_version = 2
        adjustment_id: str
        currency: int
        rank_points: int
        reason: str
        source: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["source"] = None

    @event(Spent)
    def _spent(self, order_id: str, amount: int, source: str | None) -> None:
        self.orders[(source, order_id)] = amount
        self.currency -= amount

    @event(Refunded)
    def _refunded(self, order_id: str, amount: int, source: str | None) -> None:
        self.refunded_orders.add((source, order_id))
        self.currency += amount

    @event(Adjusted)
    def _adjusted(
        self,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        source: str | None,
    ) -> None:
        self.adjustments[(source, adjustment_id)] = (currency, rank_points, reason)
        self.currency += currency
        self.lifetime_currency += currency
        self.rank_points += rank_points

    @event("RankChanged")
    def _rank_changed(self, old: str | None, new: str | None) -> None:
        self.rank = new


def replay(events: Iterable[Any]) -> Member:
    """Rebuild a Member from its events, oldest first, as the repository does:
    ``event.mutate(None)`` for the Created event, then ``event.mutate(member)``."""
    member: Member | None = None
    for domain_event in events:
        member = domain_event.mutate(member)
    if member is None:
        raise ValueError("no events to replay")
    return member
