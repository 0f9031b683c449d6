"""The API's wire schemas (pydantic v2), separate from domain objects.

Response-only documents live here, one module per route group; the command models the
console and the CLI use too (request bodies, field types, ``parse_rfc3339``) live below
every entrypoint, in ``loyalty.application.commands``, and are re-exported here so the
routes read one place. Importing this package attaches the /docs examples
(``examples``)."""

from loyalty.api.schemas.common import FieldError, Health, Problem
from loyalty.api.schemas.examples import OPENAPI_EXAMPLES
from loyalty.api.schemas.explain import AmountsBody, DryRunBody, ExplanationBody
from loyalty.api.schemas.ingress import BatchAccepted, DuplicateEvent, RejectedEvent
from loyalty.api.schemas.members import (
    AdjustmentBody,
    ExpiringBody,
    ForgetAccepted,
    ForgetReceipt,
    HistoryBody,
    HistoryEntryBody,
    LeaderboardBody,
    LeaderboardEntry,
    MemberBody,
    OrderBody,
    PendingBody,
    RefundBody,
)
from loyalty.api.schemas.operations import (
    PipelineBody,
    StorageBody,
    StorageLocationBody,
    StorageTotalBody,
    rules_document,
)
from loyalty.application.commands.accounts import (
    AdjustmentRequest,
    Amount,
    RefundRequest,
    SignedAmount,
    SpendRequest,
)
from loyalty.application.commands.fields import (
    DAY,
    RFC3339,
    STORED_INT,
    USER_ID_PATTERN,
    Day,
    EventType,
    Identifier,
    Reason,
    StoredInt,
    UserIdentifier,
    parse_rfc3339,
)
from loyalty.application.commands.forget import ForgetRequestBody
from loyalty.application.commands.ingress import Batch, IngressEvent
from loyalty.application.commands.periods import DryRunPeriod, DryRunRequest, ReportRange
from loyalty.application.commands.rules import (
    CurrencyExpiryBody,
    MultiplierBody,
    RankBody,
    RankQualificationBody,
    RollingPeriod,
    RuleBody,
    RulesBody,
    RulesRequest,
)

__all__ = [
    "DAY",
    "OPENAPI_EXAMPLES",
    "RFC3339",
    "STORED_INT",
    "USER_ID_PATTERN",
    "AdjustmentRequest",
    "Amount",
    "AmountsBody",
    "Batch",
    "BatchAccepted",
    "CurrencyExpiryBody",
    "Day",
    "DryRunBody",
    "DryRunPeriod",
    "DryRunRequest",
    "DuplicateEvent",
    "EventType",
    "ExpiringBody",
    "ExplanationBody",
    "FieldError",
    "ForgetAccepted",
    "ForgetReceipt",
    "ForgetRequestBody",
    "Health",
    "HistoryBody",
    "HistoryEntryBody",
    "Identifier",
    "IngressEvent",
    "LeaderboardBody",
    "LeaderboardEntry",
    "MemberBody",
    "MultiplierBody",
    "OrderBody",
    "PendingBody",
    "AdjustmentBody",
    "RefundBody",
    "PipelineBody",
    "Problem",
    "RankBody",
    "RankQualificationBody",
    "Reason",
    "RefundRequest",
    "RejectedEvent",
    "ReportRange",
    "RollingPeriod",
    "RuleBody",
    "RulesBody",
    "RulesRequest",
    "SignedAmount",
    "SpendRequest",
    "StorageBody",
    "StorageLocationBody",
    "StorageTotalBody",
    "StoredInt",
    "UserIdentifier",
    "parse_rfc3339",
    "rules_document",
]
