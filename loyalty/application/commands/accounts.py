"""Commands on a member's account: spend, refund, adjust (the API and the console)."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
)

from loyalty.application.commands.fields import (
    Identifier,
    Reason,
)
from loyalty.domain.limits import (
    MAX_AMOUNT,
)

# Strict: 1.5, "5", true and 5.0 are refused (422), never coerced.
# Bounds: ``loyalty.domain.limits`` (the domain refuses the same).
Amount = Annotated[int, Strict(), Field(gt=0, le=MAX_AMOUNT)]
SignedAmount = Annotated[int, Strict(), Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]


class SpendRequest(BaseModel):
    """Spend currency on an order; idempotent by ``order_id``."""

    model_config = ConfigDict(extra="forbid")

    order_id: Identifier = Field(description="the shop's order id; a replay is idempotent")
    amount: Amount = Field(description="positive integer amount of currency")
    description: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="accepted for the shop's convenience; never stored"
    )


class RefundRequest(BaseModel):
    """Refund a spent order, in full or in parts: each refund is idempotent by its
    ``refund_id`` within the order, and the refunds of an order add up to at most the
    amount spent."""

    model_config = ConfigDict(extra="forbid")

    order_id: Identifier = Field(description="the order id the spend used")
    refund_id: Identifier | None = Field(
        None,
        description="idempotency key of this refund within the order (a repeat answers "
        "the original result); omitted: the order's one refund without an id",
    )
    amount: Amount | None = Field(
        None,
        description="positive integer amount to refund, at most what is left of the order "
        "(spent minus refunded); omitted: all that is left",
    )
    source: Identifier | None = Field(
        None,
        description="operator keys only: the name of the key that spent the order (a "
        "shop's), to refund it on the shop's behalf; the operator is recorded on the "
        "refund. Default: the caller's own order",
    )


class AdjustmentRequest(BaseModel):
    """An operator correction; either amount may be negative."""

    model_config = ConfigDict(extra="forbid")

    adjustment_id: Identifier = Field(description="idempotency key of the adjustment")
    currency: SignedAmount
    rank_points: SignedAmount
    reason: Reason = Field(description="why (stored in the account's events: no personal data)")
