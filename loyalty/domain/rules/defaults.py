"""The default rule set, in the wire shape of a rules document."""

from __future__ import annotations

from typing import Any, Final

DEFAULT_RULES_WIRE: Final[dict[str, Any]] = {
    "rules": [
        {"event_type": "logged_on", "currency": 1, "rank_points": 1, "daily_cap": 1},
        {
            "event_type": "played_game",
            "currency": 5,
            "rank_points": 10,
            "multipliers": [{"when": {"result": "win"}, "factor": 2}],
            "daily_cap": 50,
        },
        {
            "event_type": "joined_competition",
            "currency": 20,
            "rank_points": 50,
            "daily_cap": 5,
        },
        {
            "event_type": "made_purchase",
            "currency": 10,
            "rank_points": 5,
            "multipliers": [{"when": {"tier": "premium"}, "factor": "1.5"}],
        },
    ],
    "ranks": [
        {"name": "bronze", "min_rank_points": 0, "privileges": ["member_prices"]},
        {
            "name": "silver",
            "min_rank_points": 1000,
            "privileges": ["member_prices", "free_shipping"],
        },
        {
            "name": "gold",
            "min_rank_points": 5000,
            "privileges": ["member_prices", "free_shipping", "priority_support"],
        },
        {
            "name": "platinum",
            "min_rank_points": 20000,
            "privileges": [
                "member_prices",
                "free_shipping",
                "priority_support",
                "vip_events",
            ],
        },
    ],
}
"""The default rule set in wire shape. Treat as read-only (deep-copy to edit)."""
