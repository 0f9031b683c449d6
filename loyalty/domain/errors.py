"""Domain errors: one class per business failure, each with a stable machine code.

Messages are for humans and never contain a user id (they may end up in logs and
problem+json bodies). Structured details live in attributes, not in the message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

Problem = tuple[str, str]
"""A validation problem: (location, message), e.g. ("rules[2].currency", "...")."""


class DomainError(Exception):
    """Base class of every error raised by the domain layer."""

    code: ClassVar[str] = "domain_error"
    default_message: ClassVar[str] = "the request violates a business rule"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class InsufficientFunds(DomainError):
    """The member's spendable currency would go below zero."""

    code = "insufficient_funds"
    default_message = "insufficient funds"

    def __init__(self, available: int | None = None, requested: int | None = None) -> None:
        self.available = available
        self.requested = requested
        detail = None
        if available is not None and requested is not None:
            detail = f"insufficient funds: {requested} needed, {available} available"
        super().__init__(detail)


class OrderConflict(DomainError):
    """The order id was already spent with a different amount."""

    code = "order_conflict"
    default_message = "order id already used with a different amount"


class OrderNotFound(DomainError):
    """A refund names an order that was never spent."""

    code = "order_not_found"
    default_message = "order not found"


class RefundConflict(DomainError):
    """The refund id was already used on the order with a different amount."""

    code = "refund_conflict"
    default_message = "refund id already used on this order with a different amount"


class RefundExceedsOrder(DomainError):
    """A refund asks for more than is left of the order (spent minus refunded)."""

    code = "refund_exceeds_order"
    default_message = "the refund exceeds what is left of the order"

    def __init__(self, refundable: int | None = None, requested: int | None = None) -> None:
        self.refundable = refundable
        self.requested = requested
        detail = None
        if refundable is not None and requested is not None:
            detail = (
                f"the refund exceeds what is left of the order: {requested} asked, "
                f"{refundable} left to refund"
            )
        super().__init__(detail)


class AdjustmentConflict(DomainError):
    """The adjustment id was already used with different values."""

    code = "adjustment_conflict"
    default_message = "adjustment id already used with different values"


class InvalidAmount(DomainError):
    """An amount is not an integer in the allowed range."""

    code = "invalid_amount"
    default_message = "invalid amount"


class InvalidRules(DomainError):
    """A rule set (or rank ladder) is invalid; ``problems`` lists every problem."""

    code = "invalid_rules"
    default_message = "invalid rules"

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        shown = "; ".join(f"{loc or '(document)'}: {msg}" for loc, msg in self.problems)
        super().__init__(f"invalid rules: {shown}" if shown else None)


class MemberNotFound(DomainError):
    """No account exists for the requested member."""

    code = "member_not_found"
    default_message = "member not found"


class MemberBeingErased(DomainError):
    """A forget-me request for the member is being carried out: no command may touch
    the account until it is done (the pipeline retries its window later)."""

    code = "member_not_found"
    default_message = "member not found"


class AwardNotFound(DomainError):
    """No explanation for that award id (not an award of the member, or recorded before
    explanations were kept)."""

    code = "award_not_found"
    default_message = "no such award of the member"


class PeriodNotRetained(DomainError):
    """A dry run or compensation asked for days the ingress log no longer holds (or not
    yet: in the future)."""

    code = "period_not_retained"
    default_message = "the period is outside the retained ingress"
