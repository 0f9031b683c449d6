"""Deterministic, realistic activity events: a few types, ~10k users, small attributes,
``occurred_at`` within the last day. The same ``(seed, now, prefix)`` always gives the
same events, so a baseline process and a load generator can build them independently."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from loyalty.application.ingress import shard_of

USERS = 10_000
SHARDS = 16
Event = dict[str, Any]
# (shard, source, event_id, user_id, type, occurred_at, attributes_json)
Row = tuple[int, str, str, str, str, datetime, str]


def make_events(
    n: int, *, seed: int, now: datetime, prefix: str, users: int = USERS, zipf: bool = False
) -> list[Event]:
    """``n`` events over ``users`` members, uniformly or (``zipf``) with member rank r
    drawn with probability about 1/r (a few members very active, most seen once or never:
    a launch day)."""
    rnd = random.Random(seed)
    width = max(5, len(str(users - 1)))
    # Stay clear of both acceptance limits: at most ~23h50m old, never in the future.
    base = now.astimezone(UTC).replace(microsecond=0) - timedelta(seconds=30)
    span_s = 23 * 3600 + 50 * 60
    seconds: dict[int, str] = {}  # text of each second, built once
    games = [f"game-{g}" for g in range(40)]
    out: list[Event] = []
    for i in range(n):
        ago_ms = rnd.randrange(span_s * 1000)
        ago_s, ms = divmod(ago_ms, 1000)
        if ms:  # base - ago_ms = (base - ago_s - 1 s) + (1000 - ms) ms
            ago_s, ms = ago_s + 1, 1000 - ms
        second = seconds.get(ago_s)
        if second is None:
            second = (base - timedelta(seconds=ago_s)).strftime("%Y-%m-%dT%H:%M:%S")
            seconds[ago_s] = second
        r = rnd.random()
        attributes: dict[str, Any]
        if r < 0.40:
            kind, attributes = "logged_on", {"device": rnd.choice(("web", "ios", "android"))}
        elif r < 0.85:
            kind = "played_game"
            attributes = {
                "game": rnd.choice(games),
                "result": "win" if rnd.random() < 0.45 else "loss",
                "stake": rnd.choice((1, 2, 5, 10, 20)),
            }
        elif r < 0.95:
            kind, attributes = "joined_competition", {"competition": f"cup-{rnd.randrange(50)}"}
        else:
            kind, attributes = "made_deposit", {"amount": rnd.choice((10, 25, 50, 100))}
        out.append(
            {
                "event_id": f"{prefix}-{i:09d}",
                "user_id": f"user-{member(rnd, users, zipf):0{width}d}",
                "type": kind,
                "occurred_at": f"{second}.{ms:03d}Z",
                "attributes": attributes,
            }
        )
    return out


def member(rnd: random.Random, users: int, zipf: bool) -> int:
    if not zipf:
        return rnd.randrange(users)
    # P(rank <= k) = log(k + 1) / log(users): density ~ 1 / rank (Zipf, s = 1)
    return min(users - 1, int(users ** rnd.random()) - 1)


def batches(events: list[Event], size: int) -> list[list[Event]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


def body_of(batch: list[Event], batch_id: str) -> bytes:
    return orjson.dumps({"batch_id": batch_id, "events": batch})


def rows_of(batch: list[Event], source: str) -> list[Row]:
    """The ingress-log rows our service would store for ``batch``."""
    return [
        (
            shard_of(e["user_id"], SHARDS),
            source,
            e["event_id"],
            e["user_id"],
            e["type"],
            datetime.fromisoformat(e["occurred_at"]),
            orjson.dumps(e["attributes"]).decode(),
        )
        for e in batch
    ]
