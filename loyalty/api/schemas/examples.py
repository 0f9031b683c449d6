"""The examples shown at /docs, attached to their models on import."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
)

from loyalty.api.schemas.common import Health, Problem
from loyalty.api.schemas.explain import DryRunBody, ExplanationBody
from loyalty.api.schemas.ingress import BatchAccepted
from loyalty.api.schemas.members import (
    AdjustmentBody,
    ForgetAccepted,
    ForgetReceipt,
    HistoryBody,
    LeaderboardBody,
    MemberBody,
    OrderBody,
    RefundBody,
)
from loyalty.api.schemas.operations import PipelineBody
from loyalty.application.commands.accounts import AdjustmentRequest, RefundRequest, SpendRequest
from loyalty.application.commands.forget import ForgetRequestBody
from loyalty.application.commands.periods import DryRunRequest
from loyalty.application.commands.rules import RulesBody, RulesRequest

# ------------------------------------------------------------------ OpenAPI examples
# Shown at /docs. Kept apart from the classes above (each example is validated against
# its model by tests/e2e/test_openapi_examples.py). Batch and IngressEvent get theirs in
# ``create_app``'s OpenAPI document.

_WHEN = "2026-11-26T10:00:00Z"
OPENAPI_EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    BatchAccepted: {
        "batch_id": "b-1",
        "accepted": 2,
        "duplicates": 1,
        "rejected": [{"index": 3, "event_id": "e-4", "reason": "too_old"}],
        "conflicts": 1,
        "duplicate_events": [{"index": 2, "event_id": "e-1", "kind": "conflict"}],
        "unweighed_types": {"levelled_up": 1},
    },
    Problem: {
        "type": "about:blank",
        "title": "Unprocessable content",
        "status": 422,
        "code": "validation_error",
        "errors": [{"loc": "events[3].occurred_at", "msg": "must be an RFC 3339 timestamp"}],
    },
    Health: {"status": "ok"},
    MemberBody: {
        "user_id": "alice",
        "currency": 11,
        "rank_points": 21,
        "rank": "bronze",
        "privileges": ["member_prices"],
        "lifetime_currency": 11,
        "pending_currency": 3,
        "pending_rank_points": 6,
    },
    RulesBody: {
        "version": 2,
        "rules": [
            {"event_type": "logged_on", "currency": 1, "rank_points": 1, "daily_cap": 1},
            {
                "event_type": "played_game",
                "currency": 5,
                "rank_points": 10,
                "multipliers": [{"when": {"result": "win"}, "factor": "2"}],
                "daily_cap": 50,
            },
        ],
        "ranks": [
            {"name": "bronze", "min_rank_points": 0, "privileges": ["member_prices"]},
            {
                "name": "silver",
                "min_rank_points": 1000,
                "privileges": ["member_prices", "free_shipping"],
            },
        ],
    },
    PipelineBody: {
        "pending": 1200,
        "oldest_pending_age_s": 0.8,
        "processed_total": 5_400_000,
        "awards_total": 61_000,
    },
    SpendRequest: {"order_id": "o-1", "amount": 5, "description": "coffee mug"},
    RefundRequest: {"order_id": "o-1", "refund_id": "r-1", "amount": 2},
    OrderBody: {"order_id": "o-1", "amount": 5, "currency": 6, "replayed": False},
    RefundBody: {
        "order_id": "o-1",
        "refund_id": "r-1",
        "amount": 2,
        "currency": 8,
        "refundable": 3,
        "replayed": False,
    },
    AdjustmentBody: {
        "user_id": "alice",
        "currency": 61,
        "rank_points": 21,
        "rank": "bronze",
        "privileges": ["member_prices"],
        "lifetime_currency": 61,
        "replayed": False,
    },
    AdjustmentRequest: {
        "adjustment_id": "adj-7",
        "currency": 50,
        "rank_points": 0,
        "reason": "goodwill: ticket 4711",
    },
    HistoryBody: {
        "pending": {
            "currency": 3,
            "rank_points": 6,
            "explanation": "/v1/members/alice/awards/pending",
        },
        "entries": [
            {"kind": "spend", "currency": -5, "rank_points": 0, "at": _WHEN, "ref": "o-1"},
            {
                "kind": "award",
                "currency": 11,
                "rank_points": 21,
                "at": _WHEN,
                "ref": "w3.0.2",
                "explanation": "/v1/members/alice/awards/w3.0.2",
            },
        ],
        "next": None,
    },
    LeaderboardBody: {
        "entries": [{"position": 1, "user_id": "alice", "rank_points": 21, "rank": "bronze"}]
    },
    ForgetRequestBody: {"user_id": "alice"},
    ForgetAccepted: {"request_id": "f-3b1c9e", "status": "pending"},
    ForgetReceipt: {
        "request_id": "f-3b1c9e",
        "status": "completed",
        "requested_at": _WHEN,
        "completed_at": "2026-11-26T10:00:02Z",
        "erased": {"member_events": 12, "member_balances": 1, "ingress_events": 40},
    },
}
OPENAPI_EXAMPLES[RulesRequest] = {
    k: v for k, v in OPENAPI_EXAMPLES[RulesBody].items() if k != "version"
}
for _model, _example in OPENAPI_EXAMPLES.items():
    _model.model_config["json_schema_extra"] = {"examples": [_example]}


_EXPLAIN_EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    ExplanationBody: {
        "user_id": "alice",
        "award_id": "w3.0.2",
        "kind": "award",
        "status": "recorded",
        "recorded_at": _WHEN,
        "rule_versions": [4],
        "event_count": 53,
        "currency": {
            "contributed": "37.5",
            "carried_in": "0.25",
            "credited": 37,
            "to_credit": None,
            "carried_out": "0.75",
        },
        "rank_points": {
            "contributed": "75",
            "carried_in": "0",
            "credited": 75,
            "to_credit": None,
            "carried_out": "0",
        },
        "complete": True,
        "by_event_type": [
            {
                "event_type": "played_game",
                "known": True,
                "events": 53,
                "capped": [{"daily_cap": 50, "events": 3}],
                "multipliers": [{"when": {"result": "win"}, "factor": "1.5", "events": 10}],
                "currency": "37.5",
                "rank_points": "75",
            }
        ],
        "compensation": None,
        "events": {
            "status": "retained",
            "retained": 53,
            "truncated": False,
            "items": [
                {
                    "source": "gamesite",
                    "event_id": "e-1",
                    "event_type": "played_game",
                    "occurred_at": _WHEN,
                }
            ],
        },
    },
    DryRunRequest: {
        "rules": {
            "rules": [{"event_type": "logged_on", "currency": 2, "rank_points": 1, "daily_cap": 1}],
            "ranks": [{"name": "bronze", "min_rank_points": 0}],
        },
        "from": "2026-11-27",
        "to": "2026-11-28",
    },
    DryRunBody: {
        "period": {"from": "2026-11-27", "to": "2026-11-28"},
        "current_version": 4,
        "events": 1_000_000,
        "members": 20_000,
        "members_with_difference": 18_200,
        "members_with_different_rank": 35,
        "totals": {
            "currency": {"current": 2_100_000, "candidate": "2150000.5", "difference": "50000.5"},
            "rank_points": {"current": 900_000, "candidate": 900_000, "difference": 0},
        },
        "largest_differences": [
            {
                "user_id": "alice",
                "currency": {"current": 120, "candidate": 180, "difference": 60},
                "rank_points": {"current": 40, "candidate": 40, "difference": 0},
                "rank": {"current": "bronze", "candidate": "bronze"},
            }
        ],
        "by_event_type": [
            {
                "event_type": "logged_on",
                "events": 30_000,
                "capped": {"current": 9_000, "candidate": 9_000},
                "currency": {"current": 21_000, "candidate": 42_000, "difference": 21_000},
                "rank_points": {"current": 21_000, "candidate": 21_000, "difference": 0},
            }
        ],
        "seconds": 7.9,
    },
}
OPENAPI_EXAMPLES.update(_EXPLAIN_EXAMPLES)
for _model, _example in _EXPLAIN_EXAMPLES.items():
    _model.model_config["json_schema_extra"] = {"examples": [_example]}
