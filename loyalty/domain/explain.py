"""Why an award is what it is: per event type, how many events, how many a daily cap
stopped (and which cap), the multipliers that matched and the exact decimal contribution
before rounding.

A *summary* is a small JSON-ready dict built from what :func:`loyalty.domain.rules.aggregate`
tallied (``explain=True``), accumulated exactly as the pipeline accumulates pending
earnings (:func:`merge`), and kept with the recorded award. Its contributions sum exactly
to the pending earnings the award recorded (:func:`totals`); the award credits the whole
units of (carried-in fraction + that sum) and carries the rest (:func:`explain`). Pure:
no I/O, no clock.

Summary shape (decimals as exact strings)::

    {"rule_versions": [3],
     "types": {"played_game": {"known": true, "events": 12, "capped": {"50": 2},
                               "multipliers": [{"when": {"result": "win"}, "factor": "2",
                                                "events": 4}],
                               "currency": "70", "rank_points": "140"}}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from loyalty.domain.rules import (
    AwardDraft,
    RuleSet,
    decimal_to_wire,
    exact_difference,
    exact_sum,
)

Summary = dict[str, Any]

EMPTY: Summary = {"rule_versions": [], "types": {}}


def _text(value: Decimal) -> str:
    """Exact, plain and short: ``"390"``, ``"0.5"`` (never ``"-0.0"``)."""
    if not value:
        return "0"
    return str(decimal_to_wire(value))


def _multiplier_key(entry: Mapping[str, Any]) -> tuple[bytes, str]:
    return orjson.dumps(entry["when"], option=orjson.OPT_SORT_KEYS), str(entry["factor"])


def summarize(draft: AwardDraft, rule_set: RuleSet) -> Summary:
    """The summary of one member's aggregation (``draft.by_type`` must be tallied)."""
    if draft.by_type is None:
        raise ValueError("the draft was aggregated without explain=True")
    types: dict[str, Any] = {}
    for event_type, line in draft.by_type.items():
        rule = rule_set.rules.get(event_type)
        entry: dict[str, Any] = {"known": line.known, "events": line.events}
        if rule is not None:
            if line.capped:
                entry["capped"] = {str(rule.daily_cap): line.capped}
            entry["multipliers"] = [
                {
                    "when": dict(rule.multipliers[i].when),
                    "factor": str(decimal_to_wire(rule.multipliers[i].factor)),
                    "events": n,
                }
                for i, n in sorted(line.matched.items())
            ]
            entry["currency"] = _text(line.currency)
            entry["rank_points"] = _text(line.rank_points)
        types[event_type] = entry
    return {"rule_versions": [rule_set.version], "types": types}


def merge(before: Summary | None, more: Summary) -> Summary:
    """``before`` and ``more`` as one summary (counts and exact sums added)."""
    if before is None:
        return more
    types: dict[str, Any] = {k: dict(v) for k, v in before["types"].items()}
    for event_type, line in more["types"].items():
        old = types.get(event_type)
        if old is None:
            types[event_type] = line
            continue
        merged: dict[str, Any] = {
            "known": bool(old.get("known")) or bool(line.get("known")),
            "events": old["events"] + line["events"],
        }
        capped = dict(old.get("capped", {}))
        for cap, n in line.get("capped", {}).items():
            capped[cap] = capped.get(cap, 0) + n
        if capped:
            merged["capped"] = capped
        if "currency" in old or "currency" in line:
            multipliers = {_multiplier_key(m): dict(m) for m in old.get("multipliers", [])}
            for m in line.get("multipliers", []):
                key = _multiplier_key(m)
                if key in multipliers:
                    multipliers[key]["events"] += m["events"]
                else:
                    multipliers[key] = dict(m)
            merged["multipliers"] = list(multipliers.values())
            merged["currency"] = _text(
                exact_sum(Decimal(old.get("currency", "0")), Decimal(line.get("currency", "0")))
            )
            merged["rank_points"] = _text(
                exact_sum(
                    Decimal(old.get("rank_points", "0")), Decimal(line.get("rank_points", "0"))
                )
            )
        types[event_type] = merged
    versions = sorted(set(before["rule_versions"]) | set(more["rule_versions"]))
    return {"rule_versions": versions, "types": types}


def totals(summary: Summary) -> tuple[Decimal, Decimal]:
    """The exact (currency, rank points) the summary's events contributed."""
    lines = summary["types"].values()
    return (
        exact_sum(*(Decimal(line.get("currency", "0")) for line in lines)),
        exact_sum(*(Decimal(line.get("rank_points", "0")) for line in lines)),
    )


def dumps(summary: Summary) -> str:
    return orjson.dumps(summary).decode()


def loads(text: str | None) -> Summary | None:
    return None if text is None else dict(orjson.loads(text))


@dataclass(frozen=True, slots=True)
class Amounts:
    """How an award's whole units came about, per kind (currency or rank points):
    ``carried_in + contributed == credited + carried_out``, exactly."""

    contributed: Decimal
    carried_in: Decimal
    credited: int
    carried_out: Decimal

    def to_wire(self, *, pending: bool = False) -> dict[str, Any]:
        """Recorded: ``credited`` (``to_credit`` null). Pending: nothing is credited yet
        (``credited`` null); ``to_credit`` is what the next recording would credit."""
        return {
            "contributed": _text(self.contributed),
            "carried_in": _text(self.carried_in),
            "credited": None if pending else self.credited,
            "to_credit": self.credited if pending else None,
            "carried_out": _text(self.carried_out),
        }


def amounts(contributed: Decimal, credited: int, carried_out: Decimal) -> Amounts:
    """The carried-in fraction is what makes the identity hold: the account's fraction
    before the award (``credited + carried_out - contributed``)."""
    carried_in = exact_difference(exact_sum(Decimal(credited), carried_out), contributed)
    return Amounts(contributed, carried_in, credited, carried_out)


def pending_amounts(contributed: Decimal, carried_in: Decimal) -> Amounts:
    """A pending award: what the next recording would credit and carry."""
    total = exact_sum(carried_in, contributed)
    whole = int(total.to_integral_value(rounding="ROUND_FLOOR"))
    return Amounts(contributed, carried_in, whole, exact_difference(total, Decimal(whole)))


def types_to_wire(summary: Summary) -> list[dict[str, Any]]:
    """The summary's lines as a list (sorted by event type), capped counts as
    ``[{"daily_cap": 50, "events": 2}]``."""
    out = []
    for event_type, line in sorted(summary["types"].items()):
        entry: dict[str, Any] = {
            "event_type": event_type,
            "known": bool(line.get("known")),
            "events": line["events"],
            "capped": [
                {"daily_cap": int(cap), "events": n}
                for cap, n in sorted(line.get("capped", {}).items())
            ],
            "multipliers": line.get("multipliers", []),
            "currency": line.get("currency", "0"),
            "rank_points": line.get("rank_points", "0"),
        }
        out.append(entry)
    return out
