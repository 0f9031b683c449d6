"""Spend, refund, compensate and adjust: the account commands, idempotent by order,
adjustment or run id, each deciding on the aggregate."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from loyalty.application.accounts.members import Members, StreamErased, with_retry
from loyalty.application.accounts.store import Accounts
from loyalty.application.pending import (
    PendingRow,
)
from loyalty.domain.errors import DomainError, MemberBeingErased, MemberNotFound
from loyalty.domain.expiry import CurrencyExpiry, month_of
from loyalty.domain.member import FULL_REFUND, Member, scoped_key
from loyalty.domain.ranks import RankLadder

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OrderResult:
    """The answer to a spend or refund: the order, its amount and the balance right
    after it (the same on every replay of the command)."""

    order_id: str
    amount: int
    currency: int
    # True: the command was done by an earlier request; this is that request's answer
    # (``currency`` is the balance right after it, not now)
    replayed: bool = False
    # a refund: its refund id (None: made without one) and what was left to refund of
    # the order right after it
    refund_id: str | None = None
    refundable: int | None = None


@dataclass(frozen=True, slots=True)
class AdjustmentResult:
    """An adjustment's answer: the member right after it (the same on every replay) and
    whether this request replayed an earlier one."""

    member: Member
    replayed: bool


class SpendingMetrics(Protocol):
    """Where account commands are counted (implemented by ``loyalty.observability``).
    ``outcome`` is ``applied``, ``replayed`` or a domain error code."""

    def account_command(self, command: str, outcome: str, amount: int) -> None: ...


APPLIED = "applied"
REPLAYED = "replayed"


def _is(domain_event: Any, name: str) -> bool:
    return type(domain_event).__name__ == name


class Spending:
    """Spend, refund and adjust on member accounts. Every decision reads the aggregate
    (never a projection); a conflicting concurrent save is retried from a fresh read.

    A replayed command answers exactly as the first time: the balance is the one right
    after the original event, found by replaying the member's stream up to it."""

    LOCK_STRIPES = 256

    def __init__(
        self,
        accounts: Accounts,
        metrics: SpendingMetrics | None = None,
        ranks: Callable[[], RankLadder] | None = None,
        expiry: Callable[[], CurrencyExpiry | None] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._accounts = accounts
        # the current rank ladder: a recording of pending earnings records rank changes
        self._ranks = ranks or (lambda: RankLadder())
        # the current expiry rule (a refund into an expired lot expires at once) and the
        # clock (the month an adjustment's currency is earned in; the refund's "now")
        self._expiry = expiry or (lambda: None)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._metrics = metrics
        # Commands on one member from this process's threads queue on a striped lock
        # instead of racing to save the same version: without it a hot member under
        # many concurrent spends can exhaust the optimistic retries. Conflicts with
        # other processes (and the pipeline's awards) are still retried.
        self._stripes = [threading.Lock() for _ in range(self.LOCK_STRIPES)]

    def _locked(self, user_id: str, action: Callable[[], T]) -> Callable[[], T]:
        """Run ``action`` under the member's stripe lock. A save the store refused
        because the member is being erased answers as being erased; one refused because
        it was erased (a stale copy) is read again from the store (by ``with_retry``):
        the same answer as a command arriving after the erasure."""
        lock = self._stripes[hash(user_id) % self.LOCK_STRIPES]

        def run() -> T:
            with lock:
                try:
                    return action()
                except StreamErased as exc:
                    self._accounts.refused(exc)
                    raise

        return run

    @property
    def app(self) -> Members:
        return self._accounts.app

    def _observed(self, command: str, run: Callable[[], tuple[T, str, int]]) -> T:
        """Run a command, counting its outcome (applied, replayed, error code)."""
        if self._metrics is None:
            return run()[0]
        try:
            result, outcome, amount = run()
        except DomainError as exc:
            self._metrics.account_command(command, exc.code, 0)
            raise
        except Exception:
            self._metrics.account_command(command, "error", 0)
            raise
        self._metrics.account_command(command, outcome, amount)
        return result

    def _save(self, member: Member, row: PendingRow | None = None) -> None:
        # On a conflict (IntegrityError) nothing needs evicting: the repository hands out
        # deep copies of cached aggregates and fast-forwards the cached one on each get.
        # The fence: the markers as read by this command's load, just before it.
        # ``row``: the pending row recorded by this save (deleted in its transaction).
        self._accounts.save(
            member, fence=self._accounts.fence(), consumed=() if row is None else (row,)
        )

    def _with_pending(self, member: Member, ranks: RankLadder | None) -> PendingRow | None:
        """Record the member's pending earnings on ``member`` (before the command, in
        the command's save). Read after the member: a window committed in between only
        makes the save fail its revision check and the command retry."""
        row = self._accounts.pending_of(member.user_id)
        if row is None:
            return None
        ladder = ranks if ranks is not None else self._ranks()
        return row if self._accounts.fold(member, row, ladder) else None

    def _state_after(
        self, user_id: str, match: Callable[[Any], bool], *, with_rank_change: bool = False
    ) -> Member:
        """The member as it was right after the first event satisfying ``match`` (and
        the RankChanged event the same command recorded, if ``with_rank_change``)."""
        member: Any = None
        found = False
        stream: Iterable[Any] = self.app.events.get(Member.create_id(user_id))
        for domain_event in stream:
            if found:
                if with_rank_change and type(domain_event).__name__ == "RankChanged":
                    member = domain_event.mutate(member)
                break
            member = domain_event.mutate(member)
            found = match(domain_event)
        if member is None:  # the stream is gone: erased since the copy was loaded
            self._accounts.evict(user_id)
            raise MemberNotFound()
        if not found:  # the aggregate said it happened: the stream must show it
            raise LookupError("event not found in the member's stream")
        assert isinstance(member, Member)
        return member

    def spend(
        self, user_id: str, order_id: str, amount: int, source: str | None = None
    ) -> OrderResult:
        """Spend for ``source``'s ``order_id`` (order ids are scoped by source)."""

        def action() -> tuple[OrderResult, str, int]:
            member = self._accounts.get(user_id)
            key = member.order_key(order_id, source)
            replay = key in member.orders
            if replay:
                member.spend(order_id, amount, source)  # raises OrderConflict
                after = self._state_after(
                    user_id,
                    lambda e: _is(e, "Spent") and scoped_key(e.source, e.order_id) == key,
                )
                return OrderResult(order_id, amount, after.currency, True), REPLAYED, amount
            row = self._with_pending(member, None)  # pending currency is spendable
            member.spend(order_id, amount, source)  # raises InsufficientFunds
            self._save(member, row)
            return OrderResult(order_id, amount, member.currency), APPLIED, amount

        return self._observed(
            "spend", lambda: with_retry(self._locked(user_id, action), what="spend")
        )

    def refund(
        self,
        user_id: str,
        order_id: str,
        source: str | None = None,
        by: str | None = None,
        refund_id: str | None = None,
        amount: int | None = None,
    ) -> OrderResult:
        """Refund ``amount`` (None: all that is left) of ``source``'s ``order_id``
        (another source's order is not found), idempotent by ``refund_id`` within the
        order (None: the order's one refund without an id); ``by``: the operator
        refunding on the source's behalf, recorded on the event."""

        def action() -> tuple[OrderResult, str, int]:
            member = self._accounts.get(user_id)
            key = member.order_key(order_id, source)
            wanted = refund_id or FULL_REFUND
            if member.refund_of(key, refund_id) is not None:
                done = member.refund(order_id, source, refund_id=refund_id, amount=amount)
                after = self._state_after(
                    user_id,
                    lambda e: (
                        _is(e, "Refunded")
                        and scoped_key(e.source, e.order_id) == key
                        and (e.refund_id or FULL_REFUND) == wanted
                    ),
                )
                result = OrderResult(
                    order_id, done, after.currency, True, refund_id, after.refundable(key)
                )
                return result, REPLAYED, done
            if key not in member.orders:
                member.refund(order_id, source)  # raises OrderNotFound
            row = self._with_pending(member, None)
            done = member.refund(
                order_id,
                source,
                self._expiry(),
                self._clock(),
                by=by,
                refund_id=refund_id,
                amount=amount,
            )
            self._save(member, row)
            result = OrderResult(
                order_id, done, member.currency, False, refund_id, member.refundable(key)
            )
            return result, APPLIED, done

        return self._observed(
            "refund", lambda: with_retry(self._locked(user_id, action), what="refund")
        )

    def compensate(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        source: str | None = None,
        fence: int | None = None,
    ) -> tuple[int, int, bool] | None:
        """An adjustment that never takes a balance below zero: a deduction larger than
        the balance (after the member's pending earnings are recorded in the same save)
        deducts what is there. Idempotent by ``source``'s ``adjustment_id``: a replay
        changes nothing and answers what was applied the first time. Returns (currency,
        rank points applied, replayed).

        ``fence``: the erasure generation the caller read before it weighed what it
        compensates; the save passes it to the event insert, which refuses a member being
        erased or erased since. Then nothing is saved (no account is created) and the
        answer is None."""

        def action() -> tuple[tuple[int, int, bool] | None, str, int]:
            try:
                member = self._accounts.get(user_id)
            except MemberNotFound:
                member = Member(user_id=user_id)
            except MemberBeingErased:
                if fence is None:
                    raise
                return None, "erased", 0
            done = member.adjustments.get(member.adjustment_key(adjustment_id, source))
            if done is not None:
                return (done.currency, done.rank_points, True), REPLAYED, done.currency
            ranks = self._ranks()
            row = self._with_pending(member, ranks)
            applied_currency = max(currency, -member.currency)
            applied_points = max(rank_points, -member.rank_points)
            member.adjust(adjustment_id, applied_currency, applied_points, reason, ranks, source)
            if fence is None:
                self._save(member, row)
            else:
                try:
                    self._accounts.save(member, fence=fence, consumed=() if row is None else (row,))
                except StreamErased as exc:
                    if exc.reason == "gone":  # a stale copy: read again
                        raise
                    with contextlib.suppress(MemberBeingErased):
                        self._accounts.refused(exc)  # evicts; raises while erasing
                    return None, "erased", 0
            return (applied_currency, applied_points, False), APPLIED, applied_currency

        return self._observed(
            "adjustment", lambda: with_retry(self._locked(user_id, action), what="adjustment")
        )

    def adjust(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        ranks: RankLadder,
        source: str | None = None,
    ) -> Member:
        """Apply an operator adjustment (ids scoped by ``source``); returns the member
        right after it. An unknown member gets an account (an operator may credit
        someone who has not earned yet); a rejected adjustment creates nothing."""
        return self.adjust_marked(
            user_id, adjustment_id, currency, rank_points, reason, ranks, source
        ).member

    def adjust_marked(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        ranks: RankLadder,
        source: str | None = None,
    ) -> AdjustmentResult:
        """:meth:`adjust`, saying whether it was a replay of an earlier request."""

        def action() -> tuple[AdjustmentResult, str, int]:
            try:
                member = self._accounts.get(user_id)
            except MemberNotFound:
                member = Member(user_id=user_id)
            key = member.adjustment_key(adjustment_id, source)
            if key not in member.adjustments:
                row = self._with_pending(member, ranks)
                member.adjust(
                    adjustment_id,
                    currency,
                    rank_points,
                    reason,
                    ranks,
                    source,
                    month=month_of(now := self._clock()),
                    on=now.astimezone(UTC).date().isoformat(),
                )
                self._save(member, row)
                return AdjustmentResult(member, False), APPLIED, currency
            member.adjust(adjustment_id, currency, rank_points, reason, ranks, source)
            after = self._state_after(
                user_id,
                lambda e: _is(e, "Adjusted") and scoped_key(e.source, e.adjustment_id) == key,
                with_rank_change=True,
            )
            return AdjustmentResult(after, True), REPLAYED, currency

        return self._observed(
            "adjustment", lambda: with_retry(self._locked(user_id, action), what="adjustment")
        )
