"""Member accounts: the eventsourcing Application and the use cases on it.

``members`` (the event store application, the erasure port, the retry), ``store`` (the
accounts: load, save, fold pending earnings, award), ``spending`` (spend, refund,
compensate, adjust); ``views`` (what the API shows of a member: import it from
there, it is not re-exported here, being above the pipeline's ports)."""

from loyalty.application.accounts.members import (
    FENCE,
    MAX_ATTEMPTS,
    PREFETCH_GROUP,
    SAVE_GROUP,
    AwardCommand,
    MemberMarkers,
    Members,
    StreamErased,
    StreamLoader,
    with_retry,
)
from loyalty.application.accounts.spending import (
    APPLIED,
    REPLAYED,
    OrderResult,
    Spending,
    SpendingMetrics,
)
from loyalty.application.accounts.store import Accounts

__all__ = [
    "APPLIED",
    "FENCE",
    "MAX_ATTEMPTS",
    "PREFETCH_GROUP",
    "REPLAYED",
    "SAVE_GROUP",
    "Accounts",
    "AwardCommand",
    "MemberMarkers",
    "Members",
    "OrderResult",
    "Spending",
    "SpendingMetrics",
    "StreamErased",
    "StreamLoader",
    "with_retry",
]
