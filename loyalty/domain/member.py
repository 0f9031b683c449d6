"""The Member aggregate: a member's loyalty account, event-sourced.

Public command methods validate and derive; private ``@event`` methods only
assign state, so replaying stored events is cheap and deterministic. Every
command is idempotent by its id (award_id, order_id, adjustment_id).

Award idempotency takes constant space: the pipeline's award ids are window ends
``w{shard}.{txid}.{seq}``, a shard's window ends strictly increase and a member's events
all go to one shard, so the member keeps only the highest window end awarded per shard
(``award_positions``) and an award at or below it is a replay. Any other award id (tools,
tests) is kept as it is (``other_award_ids``); the pipeline never makes one.

Pending earnings (version 3 of the state, version 2 of ``Awarded``): the pipeline sums
each member's exact weights into a pending balance and records it as one award now and
then (:meth:`Member.record_pending`). A recording credits the whole units of the carried
fraction plus the pending amount and carries the exact rest (``fraction_currency``,
``fraction_rank_points``, in [0, 1)), so what a member is credited over any period is the
floor of the exact sum of its weights, however the windows and recordings fell.
``Awarded`` stores the fractions after it; version-1 awards (whose fraction was dropped)
load with a zero fraction, version-2 states with zero fractions.

Version 2 of the state (``class_version``): ``award_positions`` + ``other_award_ids``
instead of every award id ever seen, ``Adjustment`` values instead of tuples (JSON has no
tuple, so a snapshot could not give them back). Stored events are unchanged: replaying a
version-1 stream builds the version-2 state; ``upcast_v1_v2`` converts a version-1 state.

Order ids and adjustment ids are scoped by *source* (the name of the API key that sent
the command, as ingest de-duplication is): shop A's ``o-77`` and shop B's ``o-77`` are two
orders, and B can neither replay nor refund A's. They are kept under one string key per
(source, id) (:func:`scoped_key`; JSON object keys are strings, so a snapshot keeps
them). Events stored before sources were recorded (``Spent``, ``Refunded``, ``Adjusted``
version 1) load with ``source = None``: such a legacy id answers every source as before
(a replay is still a replay, never a second charge).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, cast
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import get_topic

from loyalty.domain.errors import (
    AdjustmentConflict,
    InsufficientFunds,
    InvalidAmount,
    OrderConflict,
    OrderNotFound,
    RefundConflict,
    RefundExceedsOrder,
)
from loyalty.domain.expiry import LEGACY, CurrencyExpiry, credit, debit_fifo, is_month
from loyalty.domain.limits import (
    MAX_AMOUNT,
    MAX_REASON_LENGTH,
    check_amount,
    check_balance,
    check_text,
)
from loyalty.domain.qualification import prune
from loyalty.domain.ranks import RankLadder, is_int
from loyalty.domain.rules import exact_difference, exact_sum, split_whole

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


_PIPELINE_AWARD_ID = re.compile(r"w([0-9]{1,10})\.([0-9]{1,20})\.([0-9]{1,20})")


def award_position(award_id: str) -> tuple[str, list[int]] | None:
    """``(shard key, [txid, seq])`` of a pipeline award id ``w{shard}.{txid}.{seq}``
    (``loyalty.application.pipeline.award_id_for``), or None for any other id, including
    a non-canonical spelling of one (``w03.1.2``): such ids are matched exactly."""
    match = _PIPELINE_AWARD_ID.fullmatch(award_id)
    if match is None:
        return None
    shard, txid, seq = (int(group) for group in match.groups())
    if f"w{shard}.{txid}.{seq}" != award_id:
        return None
    return str(shard), [txid, seq]


def scoped_key(source: str | None, id_: str) -> str:
    """The key of ``source``'s order or adjustment id ``id_`` (source None: stored before
    sources were recorded). Unambiguous for any strings."""
    return json.dumps([source, id_], ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Adjustment:
    """What an adjustment id was used for (a replay must repeat it exactly)."""

    currency: int
    rank_points: int
    reason: str


@functools.lru_cache(maxsize=65_536)
def _member_id(user_id: str) -> UUID:
    """``uuid5`` of the user id, remembered: the pipeline asks for a member's id several
    times per window (prefetch, load, record, settle), and the SHA-1 behind each was 6 %
    of its time in a profile."""
    return uuid5(NAMESPACE, user_id)


_IMMUTABLE = frozenset({int, str, bool, Decimal, UUID, datetime, date, type(None)})
_FLAT = frozenset(
    {"other_award_ids", "orders", "refunded_orders", "adjustments", "lots", "rank_days"}
    | {"expired_lots"}
)
"""A member's containers of immutables (strings, ints, frozen ``Adjustment``)."""
_NESTED = frozenset({"award_positions", "order_refunds", "order_lots"})
"""A member's dicts of containers of immutables."""


class Member(Aggregate):
    """A member's account: spendable currency, lifetime rank points, rank."""

    class_version = 5

    @staticmethod
    def create_id(user_id: str) -> UUID:
        """The deterministic aggregate id of ``user_id``."""
        return _member_id(user_id)

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
        self.award_positions: dict[str, list[int]] = {}
        """Per shard (``str(shard)``), the highest window end ``[txid, seq]`` awarded."""
        self.other_award_ids: set[str] = set()
        """Award ids not in the pipeline's form, each kept (the pipeline makes none)."""
        self.orders: dict[str, int] = {}
        """Amount per :func:`scoped_key` (source, order id)."""
        self.refunded_orders: set[str] = set()
        """The order keys refunded in full (nothing left to refund)."""
        self.order_refunds: dict[str, dict[str, int]] = {}
        """Per order key, the amount of each refund by its refund id (``""``: the refund
        made without a refund id, one per order; every refund before version 5)."""
        self.adjustments: dict[str, Adjustment] = {}
        self.fraction_currency = Decimal(0)
        """Exact currency earned but not credited (less than one unit)."""
        self.fraction_rank_points = Decimal(0)
        """Exact rank points earned but not credited (less than one point)."""
        self.lots: dict[str, int] = {}
        """Currency per month earned (``"YYYY-MM"``; :data:`LEGACY` for currency from
        before lots were tracked); the sum is ``currency``."""
        self.order_lots: dict[str, dict[str, int]] = {}
        """Per order key, what its spend took from each lot (a refund puts it back)."""
        self.rank_days: dict[str, int] = {}
        """Rank points per UTC day earned (``"YYYY-MM-DD"``; recent days only, see
        ``loyalty.domain.qualification``): what qualification periods count."""
        self.expired_lots: dict[str, int] = {}
        """Per lot, the currency expired from it (a lot here is closed: anything put back
        into it later expires at once)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Member:
        """A copy sharing nothing mutable (what a fold on a copy needs: the member view's
        and a spend's ``with_pending``), copying the containers whole (C speed) by their
        known shapes: the generic deep copy walked every entry in Python, ~90 µs a new
        member and ~1.7 ms one with 500 orders, on every read of an account with pending
        earnings. An attribute of another shape is deep-copied the generic way."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        state: dict[str, Any] = {}
        for name, value in vars(self).items():
            if type(value) in _IMMUTABLE:
                state[name] = value
            elif name in _FLAT:
                state[name] = value.copy()
            elif name in _NESTED:
                state[name] = {key: inner.copy() for key, inner in value.items()}
            else:
                state[name] = copy.deepcopy(value, memo)
        clone.__dict__.update(state)
        return clone

    @staticmethod
    def upcast_v4_v5(state: dict[str, Any]) -> None:
        """A version-4 state: refunds were whole orders, without refund ids."""
        orders = state.get("orders", {})
        state["order_refunds"] = {
            key: {FULL_REFUND: orders[key]}
            for key in state.get("refunded_orders", set())
            if key in orders
        }

    @staticmethod
    def upcast_v3_v4(state: dict[str, Any]) -> None:
        """A version-3 state: its whole balance is the legacy lot (no month known), and
        so is every unrefunded order's amount (as a replay of its events gives)."""
        currency = state.get("currency", 0)
        state["lots"] = {LEGACY: currency} if currency else {}
        refunded = state.get("refunded_orders", set())
        state["rank_days"] = {}
        state["order_lots"] = {
            key: {LEGACY: amount}
            for key, amount in state.get("orders", {}).items()
            if key not in refunded and amount
        }
        state["expired_lots"] = {}

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        """A version-2 state: no fractions were carried then."""
        state["fraction_currency"] = Decimal(0)
        state["fraction_rank_points"] = Decimal(0)

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """A version-1 state (a snapshot): every award id seen -> one high-water position
        per shard plus the other ids; adjustment tuples (or JSON lists) -> Adjustment;
        order and adjustment ids (no source then) -> their scoped keys."""
        positions: dict[str, list[int]] = {}
        others: set[str] = set()
        for award_id in state.pop("award_ids", ()):
            position = award_position(award_id)
            if position is None:
                others.add(award_id)
                continue
            shard, end = position
            if shard not in positions or end > positions[shard]:
                positions[shard] = end
        state["award_positions"] = positions
        state["other_award_ids"] = others
        state["orders"] = {
            scoped_key(None, key): value for key, value in state.get("orders", {}).items()
        }
        state["refunded_orders"] = {
            scoped_key(None, key) for key in state.get("refunded_orders", ())
        }
        state["adjustments"] = {
            scoped_key(None, key): Adjustment(*value)
            for key, value in state.get("adjustments", {}).items()
        }

    # ------------------------------------------------------------ scoped ids

    @staticmethod
    def _scoped(known: Collection[str], source: str | None, id_: str) -> str:
        """The key of ``id_`` from ``source``: its own, a legacy one (no source) if
        only that is known, else its own (new)."""
        own = scoped_key(source, id_)
        if own not in known:
            legacy = scoped_key(None, id_)
            if legacy in known:
                return legacy
        return own

    def order_sources(self, order_id: str) -> list[str | None]:
        """The sources with an unrefunded order ``order_id`` on this account (None: an
        order from before sources were recorded): what an operator may refund."""
        found = []
        for key in self.orders:
            if key in self.refunded_orders:
                continue
            source, id_ = json.loads(key)
            if id_ == order_id:
                found.append(source)
        return sorted(found, key=lambda s: (s is not None, s or ""))

    def order_key(self, order_id: str, source: str | None) -> str:
        """The key under which ``source``'s ``order_id`` is (or would be) stored."""
        return self._scoped(self.orders, source, order_id)

    def adjustment_key(self, adjustment_id: str, source: str | None) -> str:
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
        month: str | None = None,
        on: str | None = None,
    ) -> bool:
        """Credit an award once per ``award_id``; False (no event) on a replay. The
        currency goes to the lot of ``month`` (None: the legacy lot, never expiring by
        default), the rank points to the day ``on`` (``"YYYY-MM-DD"``; None: counted in
        no qualification period).

        A pipeline award id at or below the member's high-water position of its shard is
        a replay (windows of a shard only move forward; a crash replays the same one)."""
        if self.has_award(award_id):
            return False
        _require_int(currency, minimum=0, what="currency")
        _require_int(rank_points, minimum=0, what="rank_points")
        _require_int(event_count, minimum=0, what="event_count")
        _require_int(rule_version, minimum=0, what="rule_version")
        lot = _lot(month)
        self.trigger_event(  # the event class given directly: see _awarded
            self.Awarded,
            award_id=award_id,
            currency=currency,
            rank_points=rank_points,
            event_count=event_count,
            rule_version=rule_version,
            fraction_currency=_decimal_text(self.fraction_currency),
            fraction_rank_points=_decimal_text(self.fraction_rank_points),
            lots=_lots_text({lot: currency} if currency else {}),
            on=_day(on),
        )
        self._expire_closed()
        self._record_rank(ranks, on)
        return True

    def record_pending(
        self,
        award_id: str,
        currency: Decimal,
        rank_points: Decimal,
        event_count: int,
        rule_version: int,
        ranks: RankLadder,
        months: Mapping[str, Decimal] | None = None,
        month: str | None = None,
        expiry: CurrencyExpiry | None = None,
        as_of: datetime | None = None,
        on: str | None = None,
    ) -> bool:
        """Record pending earnings (exact decimals) as one award: credit the whole units
        of the carried fraction plus ``currency``/``rank_points`` and carry the rest.
        False (no event) when ``award_id`` is a replay (see :meth:`award`).

        ``months``: the exact pending currency per month earned (summing to
        ``currency``); the whole units go to those months' lots, the oldest months
        first taking the carried fraction (:func:`allocate`). Without it, to ``month``
        (None: the legacy lot). A part credited to a lot already expired (under
        ``expiry`` at ``as_of``, or closed before) expires at once."""
        if self.has_award(award_id):
            return False
        if not (isinstance(currency, Decimal) and isinstance(rank_points, Decimal)):
            raise InvalidAmount("pending amounts must be decimals")
        if currency < 0 or rank_points < 0:
            raise InvalidAmount("pending amounts must be >= 0")
        _require_int(event_count, minimum=0, what="event_count")
        _require_int(rule_version, minimum=0, what="rule_version")
        whole_currency, rest_currency = split_whole(exact_sum(self.fraction_currency, currency))
        whole_points, rest_points = split_whole(exact_sum(self.fraction_rank_points, rank_points))
        if months:
            lots = allocate(self.fraction_currency, months)
            if sum(lots.values()) != whole_currency:
                raise InvalidAmount("pending months must sum to the pending currency")
        else:
            lots = {_lot(month): whole_currency} if whole_currency else {}
        self.trigger_event(  # the event class given directly: see _awarded
            self.Awarded,
            award_id=award_id,
            currency=whole_currency,
            rank_points=whole_points,
            event_count=event_count,
            rule_version=rule_version,
            fraction_currency=_decimal_text(rest_currency),
            fraction_rank_points=_decimal_text(rest_points),
            lots=_lots_text(lots),
            on=_day(on),
        )
        self._expire_closed(expiry, as_of)
        self._record_rank(ranks, on)
        return True

    def with_pending(self, currency: Decimal, rank_points: Decimal) -> tuple[int, int]:
        """The whole (currency, rank points) that recording this pending would add."""
        return (
            split_whole(exact_sum(self.fraction_currency, currency))[0],
            split_whole(exact_sum(self.fraction_rank_points, rank_points))[0],
        )

    def rank_need(self, ranks: RankLadder, day: date | None = None) -> Decimal | None:
        """Exact rank points still to earn (beyond the carried fraction) before a
        recording lifts the rank under ``ranks``; None when no rank is above. Zero or
        less: any recording lifts it.

        Lifetime ranks: the next threshold above the lifetime points. Under a
        qualification period, the points that decide the rank: a recording whose rank
        points count on ``day`` lifts the rank when the period ending on ``day`` reaches
        the threshold of a rank above the *held* one (or when the period is already
        qualifying, the grace included): so the need follows a rank lowered by
        requalification and a period that rolled on (``day`` None: no day, no lift)."""
        qualification = ranks.qualification
        if qualification is None:
            above = [r.min_rank_points for r in ranks.ranks if r.min_rank_points > self.rank_points]
            if not above:
                return None
            points = Decimal(min(above) - self.rank_points)
            return exact_difference(points, self.fraction_rank_points)
        held = ranks.order(self.rank)
        above = [r.min_rank_points for i, r in enumerate(ranks.ranks) if i > held]
        if not above or day is None:
            return None
        threshold = min(above)
        if qualification.qualifying_points(self.rank_days, day) >= threshold:
            return Decimal(0)  # qualified already (any credit on ``day`` lifts it)
        period = qualification.period_points(self.rank_days, day)
        return exact_difference(Decimal(threshold - period), self.fraction_rank_points)

    def spend(self, order_id: str, amount: int, source: str | None = None) -> int:
        """Debit ``amount`` for ``source``'s ``order_id``; a replay with the same
        amount is a no-op returning the amount. Bounds: ``loyalty.domain.limits``."""
        check_text(order_id, "order_id")
        check_amount(amount, "amount", minimum=1)
        spent = self.orders.get(self.order_key(order_id, source))
        if spent is not None:
            if spent != amount:
                raise OrderConflict()
            return amount
        if self.currency < amount:
            raise InsufficientFunds(available=self.currency, requested=amount)
        self._spent(order_id=order_id, amount=amount, source=source)
        return amount

    def refund(
        self,
        order_id: str,
        source: str | None = None,
        expiry: CurrencyExpiry | None = None,
        as_of: datetime | None = None,
        by: str | None = None,
        refund_id: str | None = None,
        amount: int | None = None,
    ) -> int:
        """Put back ``amount`` (None: all that is left) of ``source``'s spent order into
        the lots it was taken from, the newest lot first; returns the amount refunded.
        Idempotent by ``refund_id`` within the order (None: the order's one refund
        without an id): a replay returns the first amount and changes nothing, the same
        id with another amount is a :class:`RefundConflict`. Several refunds of one order
        add up to at most the amount spent (:class:`RefundExceedsOrder`).

        A part whose lot has expired meanwhile (closed by an expiry, or due under
        ``expiry`` at ``as_of``) expires again at once, in the same command: the balance
        is what it would be had that part never been spent. ``by``: the operator
        refunding on ``source``'s behalf (recorded on the event)."""
        check_text(order_id, "order_id")
        if by is not None:
            check_text(by, "by")
        if refund_id is not None:
            check_text(refund_id, "refund_id")
        if amount is not None:
            check_amount(amount, "amount", minimum=1)
        key = self.order_key(order_id, source)
        spent = self.orders.get(key)
        if spent is None:
            raise OrderNotFound()
        done = self.refund_of(key, refund_id)
        if done is not None:
            if amount is not None and amount != done:
                raise RefundConflict()
            return done
        left = self.refundable(key)
        wanted = left if amount is None else amount
        if wanted > left or wanted == 0:
            raise RefundExceedsOrder(refundable=left, requested=wanted)
        legacy = key != scoped_key(source, order_id)
        self._refunded(
            order_id=order_id,
            amount=wanted,
            source=None if legacy else source,
            by=by,
            refund_id=refund_id,
        )
        self._expire_closed(expiry, as_of)
        return wanted

    def refund_of(self, key: str, refund_id: str | None) -> int | None:
        """The amount of the order ``key``'s refund ``refund_id`` (None: not made)."""
        return self.order_refunds.get(key, {}).get(refund_id or FULL_REFUND)

    def refundable(self, key: str) -> int:
        """What is left to refund of the order ``key`` (spent minus refunded)."""
        return self.orders.get(key, 0) - sum(self.order_refunds.get(key, {}).values())

    def expire(self, expiry: CurrencyExpiry | None, as_of: datetime) -> list[tuple[str, int]]:
        """Expire every open lot due under ``expiry`` at ``as_of`` (one
        ``CurrencyExpired`` per lot); returns ``[(lot, amount)]``. A lot is expired once:
        a replay (or a second job) finds nothing left in it."""
        expired: list[tuple[str, int]] = []
        if expiry is None:
            return expired
        for lot in sorted(self.lots):
            when = expiry.expires_at(lot)
            amount = self.lots[lot]
            if when is not None and when <= as_of and amount > 0:
                # the event class given directly: see _awarded (6 % of an expiry run)
                self.trigger_event(self.CurrencyExpired, amount=amount, lot=lot)
                expired.append((lot, amount))
        return expired

    def adjust(
        self,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        ranks: RankLadder,
        source: str | None = None,
        month: str | None = None,
        on: str | None = None,
    ) -> bool:
        """Operator correction (may be negative), idempotent by ``source``'s
        ``adjustment_id``; False (no event) on a replay. Added currency goes to the lot
        of ``month`` (None: legacy); taken currency comes from the oldest lots."""
        check_text(adjustment_id, "adjustment_id")
        check_amount(currency, "currency", minimum=-MAX_AMOUNT)
        check_amount(rank_points, "rank_points", minimum=-MAX_AMOUNT)
        check_text(reason, "reason", MAX_REASON_LENGTH)
        previous = self.adjustments.get(self.adjustment_key(adjustment_id, source))
        if previous is not None:
            if previous != Adjustment(currency, rank_points, reason):
                raise AdjustmentConflict()
            return False
        if self.currency + currency < 0:
            raise InsufficientFunds(available=self.currency, requested=-currency)
        if self.rank_points + rank_points < 0:
            raise InvalidAmount("rank_points would go below zero")
        check_balance(self.currency + currency, "currency")
        check_balance(self.rank_points + rank_points, "rank_points")
        self._adjusted(
            adjustment_id=adjustment_id,
            currency=currency,
            rank_points=rank_points,
            reason=reason,
            source=source,
            lot=_lot(month),
            on=_day(on),
        )
        self._expire_closed()
        self._record_rank(ranks, on)
        return True

    # --------------------------------------------------------------------- reads

    def has_award(self, award_id: str) -> bool:
        """Whether an award with this id is already credited (see :meth:`award`)."""
        position = award_position(award_id)
        if position is None:
            return award_id in self.other_award_ids
        shard, end = position
        highest = self.award_positions.get(shard)
        return highest is not None and end <= highest

    def qualified_rank(self, ranks: RankLadder, day: date) -> str | None:
        """The rank on ``day`` by the ladder's qualification period (lifetime rank
        points without one)."""
        qualification = ranks.qualification
        if qualification is None:
            return self.current_rank(ranks)
        rank = ranks.rank_for(qualification.qualifying_points(self.rank_days, day))
        return rank.name if rank is not None else None

    def requalify(self, ranks: RankLadder, as_of: datetime) -> bool:
        """Re-evaluate the rank as of ``as_of`` under the ladder's qualification period
        (the scheduled job): a lower rank is a ``RankChanged`` with reason
        ``requalification``. False when nothing changes (or ranks are lifetime)."""
        if ranks.qualification is None:
            return False
        new = self.qualified_rank(ranks, as_of.astimezone(UTC).date())
        if new == self.rank:
            return False
        lower = ranks.order(new) < ranks.order(self.rank)
        self._rank_changed(old=self.rank, new=new, reason=REQUALIFICATION if lower else THRESHOLD)
        return True

    def current_rank(self, ranks: RankLadder) -> str | None:
        """The rank name for the lifetime rank points under ``ranks``."""
        rank = ranks.rank_for(self.rank_points)
        return rank.name if rank is not None else None

    def privileges(self, ranks: RankLadder) -> tuple[str, ...]:
        """The privileges of the current rank under ``ranks``."""
        rank = ranks.rank_for(self.rank_points)
        return rank.privileges if rank is not None else ()

    # ------------------------------------------------------------------ storing

    def collect_events(self) -> Sequence[Any]:
        """The pending events to store, a new account's opening ones as one
        :class:`Enrolled` (see :func:`enrolment`): a new member costs one stored event.
        The aggregate's version becomes the stored one (the events after it are
        renumbered), so the copy kept after a save is what a replay builds."""
        events = list(super().collect_events())
        opened = enrolment(events)
        if opened is None:
            return events
        enrolled, used = opened
        rest = [
            replace(cast(Any, e), originator_version=e.originator_version - used + 1)
            for e in events[used:]
        ]
        self.version = rest[-1].originator_version if rest else 1
        if not rest:
            self.modified_on = enrolled.timestamp
        return [enrolled, *rest]

    # -------------------------------------------------------------------- events

    def _record_rank(self, ranks: RankLadder, on: str | None = None) -> None:
        if ranks.qualification is None:
            new = self.current_rank(ranks)
        else:
            # with a qualification period a credit only lifts the rank (as of its day);
            # the scheduled job lowers it (requalify)
            if on is None:
                return
            new = self.qualified_rank(ranks, date.fromisoformat(on))
            if ranks.order(new) <= ranks.order(self.rank):
                return
        if new != self.rank:
            self._rank_changed(old=self.rank, new=new, reason=THRESHOLD)

    def _expire_closed(
        self, expiry: CurrencyExpiry | None = None, as_of: datetime | None = None
    ) -> None:
        """Expire at once currency just put into a lot that has expired already."""
        for lot in sorted(self.lots):
            when = None if expiry is None or as_of is None else expiry.expires_at(lot)
            due = lot in self.expired_lots or (
                when is not None and as_of is not None and when <= as_of
            )
            if due and self.lots[lot] > 0:
                self._currency_expired(amount=self.lots[lot], lot=lot)

    class Awarded(Aggregate.Event):
        """Version 2 records the fractions carried after the award (version 1: none), as
        exact decimal strings (event attributes stay plain JSON values)."""

        class_version = 3
        award_id: str
        currency: int
        rank_points: int
        event_count: int
        rule_version: int
        fraction_currency: str
        fraction_rank_points: str
        lots: str | None
        """Version 3: the currency credited per lot (month earned) as JSON object text
        (event attributes stay plain values); None before: all to the legacy lot."""
        on: str | None
        """Version 3: the UTC day the rank points count on; None before."""

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["fraction_currency"] = "0"
            state["fraction_rank_points"] = "0"

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["lots"] = None
            state["on"] = None

    # The hot commands (award, record_pending, expire) trigger their event with the class
    # (``trigger_event``, the library's own call) rather than through the decorated
    # method: the same event and state change, without the decorator's argument binding
    # and keyword filtering on the way in (a quarter of ``record_pending``'s 31 us, half
    # of ``expire``'s 10 us). The method below still applies the event (and replays).
    @event(Awarded)
    def _awarded(
        self,
        award_id: str,
        currency: int,
        rank_points: int,
        event_count: int,
        rule_version: int,
        fraction_currency: str,
        fraction_rank_points: str,
        lots: str | None,
        on: str | None,
    ) -> None:
        position = award_position(award_id)
        if position is None:
            self.other_award_ids.add(award_id)
        else:
            shard, end = position
            highest = self.award_positions.get(shard)
            if highest is None or end > highest:
                self.award_positions[shard] = end
        self.currency += currency
        self.lifetime_currency += currency
        self.rank_points += rank_points
        credited: dict[str, int] = json.loads(lots) if lots is not None else {LEGACY: currency}
        for lot, amount in credited.items():
            credit(self.lots, lot, amount)
        self._count_day(on, rank_points)
        self.fraction_currency = Decimal(fraction_currency)
        self.fraction_rank_points = Decimal(fraction_rank_points)

    # Version 2 of these events records the source; version 1 (stored before) had none.

    class SourcedEvent(Aggregate.Event):
        """An event of a command scoped by its source (version 1 had no source)."""

        class_version = 2
        source: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["source"] = None

    class Spent(SourcedEvent):
        order_id: str
        amount: int

    class Refunded(SourcedEvent):
        """Version 3 records ``by``: the operator key that refunded the order on its
        source's behalf (None: the source itself; version 2 and before: None).
        Version 4 records ``refund_id`` (None: the refund made without one; every
        refund before, each of a whole order); ``amount`` may be part of the order."""

        class_version = 4
        order_id: str
        amount: int
        by: str | None
        refund_id: str | None

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["by"] = None

        @staticmethod
        def upcast_v3_v4(state: dict[str, Any]) -> None:
            state["refund_id"] = None

    class Adjusted(SourcedEvent):
        """Version 3 records the lot added currency goes to (before: none, legacy)."""

        class_version = 3
        adjustment_id: str
        currency: int
        rank_points: int
        reason: str
        lot: str | None
        on: str | None

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["lot"] = None
            state["on"] = None

    @event(Spent)
    def _spent(self, order_id: str, amount: int, source: str | None) -> None:
        key = scoped_key(source, order_id)
        self.orders[key] = amount
        self.order_lots[key] = debit_fifo(self.lots, amount)
        self.currency -= amount

    @event(Refunded)
    def _refunded(
        self,
        order_id: str,
        amount: int,
        source: str | None,
        by: str | None = None,
        refund_id: str | None = None,
    ) -> None:
        key = scoped_key(source, order_id)
        refunds = self.order_refunds.setdefault(key, {})
        refunds[refund_id or FULL_REFUND] = amount
        taken = self.order_lots.get(key)
        if taken is None:  # stored before lots were tracked: the legacy lot
            taken = {LEGACY: amount}
        for lot, part in take_newest(taken, amount).items():
            credit(self.lots, lot, part)
        if sum(refunds.values()) >= self.orders.get(key, amount):
            self.refunded_orders.add(key)
            self.order_lots.pop(key, None)
        self.currency += amount

    @event(Adjusted)
    def _adjusted(
        self,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        source: str | None,
        lot: str | None,
        on: str | None,
    ) -> None:
        self.adjustments[scoped_key(source, adjustment_id)] = Adjustment(
            currency, rank_points, reason
        )
        if currency >= 0:
            credit(self.lots, lot or LEGACY, currency)
        else:
            debit_fifo(self.lots, -currency)
        self._count_day(on, rank_points)
        self.currency += currency
        self.lifetime_currency += currency
        self.rank_points += rank_points

    class RankChanged(Aggregate.Event):
        """Version 2 records why: ``threshold`` (points reached or lost a threshold),
        ``requalification`` (a qualification period ended without the points to keep
        the rank), ``rules`` (a new ladder); version 1 loads as ``threshold``."""

        class_version = 2
        old: str | None
        new: str | None
        reason: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["reason"] = THRESHOLD

    @event(RankChanged)
    def _rank_changed(self, old: str | None, new: str | None, reason: str) -> None:
        self.rank = new

    class Enrolled(Aggregate.Event):
        """A new account and its first award in one stored event (issue 30): what
        ``Created``, that ``Awarded`` and, when the award ranked the member, a
        ``RankChanged`` from no rank (reason ``threshold``) were stored as before. Only
        ever an account's first event (version 1). Every reader that looks at events one
        by one (read models, rollups, the feed and the ways out, the export) reads it as
        those events (:func:`account_events`); replaying it builds the same state."""

        user_id: str
        award_id: str
        currency: int
        rank_points: int
        event_count: int
        rule_version: int
        fraction_currency: str
        fraction_rank_points: str
        lots: str | None
        on: str | None
        rank: str | None
        """The rank the award reached (None: no rank, no ``RankChanged``)."""

        def parts(self) -> tuple[Any, ...]:
            """``Created``, ``Awarded`` (and ``RankChanged`` if ranked), each with this
            event's id, version and timestamp."""
            base: dict[str, Any] = {
                "originator_id": self.originator_id,
                "originator_version": self.originator_version,
                "timestamp": self.timestamp,
            }
            award: dict[str, Any] = {
                k: v for k, v in vars(self).items() if k not in ("user_id", "rank")
            }
            opened: dict[str, Any] = {
                "originator_topic": get_topic(Member),
                "user_id": self.user_id,
            }
            created = Member.Created(**base, **opened)
            awarded = Member.Awarded(**award)
            if self.rank is None:
                return (created, awarded)
            change: dict[str, Any] = {"old": None, "new": self.rank, "reason": THRESHOLD}
            ranked = Member.RankChanged(**base, **change)
            return (created, awarded, ranked)

        def mutate(self, aggregate: Any) -> Any:
            created, *rest = self.parts()
            member = created.mutate(aggregate)  # the new aggregate, at this version
            for part in rest:
                part.apply(member)  # state only: the version stays this event's
            return member

    class CurrencyExpired(Aggregate.Event):
        """``amount`` of the lot ``lot`` (month earned, ``"YYYY-MM"``) expired."""

        amount: int
        lot: str

    def _count_day(self, on: str | None, rank_points: int) -> None:
        if on is None or not rank_points:
            return
        left = self.rank_days.get(on, 0) + rank_points
        if left:
            self.rank_days[on] = left
        else:
            self.rank_days.pop(on, None)
        prune(self.rank_days, max(self.rank_days, default=on))

    @event(CurrencyExpired)
    def _currency_expired(self, amount: int, lot: str) -> None:
        left = self.lots.get(lot, 0) - amount
        if left:
            self.lots[lot] = left
        else:
            self.lots.pop(lot, None)
        self.expired_lots[lot] = self.expired_lots.get(lot, 0) + amount
        self.currency -= amount


THRESHOLD = "threshold"
FULL_REFUND = ""
"""The refund id key of a refund made without a refund id (one per order)."""
REQUALIFICATION = "requalification"


def _day(on: str | None) -> str | None:
    if on is None:
        return None
    try:
        return date.fromisoformat(on).isoformat()
    except (TypeError, ValueError):
        raise InvalidAmount("on must be a day YYYY-MM-DD") from None


def _lot(month: str | None) -> str:
    if month is None:
        return LEGACY
    if not is_month(month):
        raise InvalidAmount("month must be YYYY-MM")
    return month


def _decimal_text(value: Decimal) -> str:
    """The exact text of ``value``, a zero never signed (exact arithmetic that rounds
    toward floor makes ``x - x`` a ``Decimal('-0')``)."""
    return str(abs(value) if value.is_zero() else value)


def take_newest(taken: dict[str, int], amount: int) -> dict[str, int]:
    """Take ``amount`` back out of what an order took per lot (``taken``, changed in
    place), the newest lot first: what a refund puts back where. Anything beyond what
    ``taken`` holds comes from the legacy lot."""
    back: dict[str, int] = {}
    left = amount
    for lot in sorted(taken, reverse=True):
        if left <= 0:
            break
        part = min(taken[lot], left)
        if part > 0:
            back[lot] = part
            left -= part
            if taken[lot] == part:
                del taken[lot]
            else:
                taken[lot] -= part
    if left > 0:
        back[LEGACY] = back.get(LEGACY, 0) + left
    return back


def _lots_text(lots: Mapping[str, int]) -> str:
    return json.dumps(dict(sorted(lots.items())), separators=(",", ":"))


def allocate(carried: Decimal, months: Mapping[str, Decimal]) -> dict[str, int]:
    """Whole units per month of exact per-month amounts, oldest month first, the
    ``carried`` fraction in front: month i gets floor(carried + sum of months up to i)
    minus the same up to i - 1, so the parts sum to floor(carried + total) and each
    month gets what accumulated whole in it."""
    out: dict[str, int] = {}
    running = carried
    before = 0
    for month in sorted(months):
        running = exact_sum(running, months[month])
        whole = split_whole(running)[0]
        if whole > before:
            out[month] = whole - before
        before = whole
    return out


def enrolment(events: Sequence[Any]) -> tuple[Any, int] | None:
    """If ``events`` (pending, oldest first) open an account with an award, the one
    :class:`Member.Enrolled` standing for its ``Created``, that ``Awarded`` and the
    ``RankChanged`` from no rank right after it (if any), and how many events it
    replaces; else None. Any other event (a lot expired at once by the award, an
    adjustment) stays its own event after it."""
    if len(events) < 2:
        return None
    created, awarded = events[0], events[1]
    if not (
        type(created) is Member.Created
        and created.originator_version == 1
        and type(awarded) is Member.Awarded
    ):
        return None
    used = 2
    rank: str | None = None
    if len(events) > 2:
        ranked = events[2]
        if type(ranked) is Member.RankChanged and ranked.old is None and ranked.reason == THRESHOLD:
            rank = ranked.new
            used = 3
            if rank is None:  # no rank to no rank: not an event the domain makes
                return None
    fields: dict[str, Any] = {
        **vars(awarded),
        "originator_version": 1,
        "timestamp": created.timestamp,
        "user_id": vars(created)["user_id"],
        "rank": rank,
    }
    enrolled = Member.Enrolled(**fields)
    return enrolled, used


def account_events(domain_event: Any) -> tuple[Any, ...]:
    """The account events a stored event stands for, in order: a
    :class:`Member.Enrolled` -> its ``Created``, ``Awarded`` (and ``RankChanged``);
    any other event -> itself. What readers of the log fold, send and count."""
    if type(domain_event) is Member.Enrolled:
        parts: tuple[Any, ...] = domain_event.parts()
        return parts
    return (domain_event,)


def replay(events: Iterable[Any]) -> Member:
    """Rebuild a Member from its events, oldest first, as the repository does:
    ``event.mutate(None)`` for the Created event, then ``event.mutate(member)``."""
    member: Member | None = None
    for domain_event in events:
        member = domain_event.mutate(member)
    if member is None:
        raise ValueError("no events to replay")
    return member
