"""The load generator's events: valid, skewed, repeatable (no network)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from loyalty.application.commands.ingress import Batch
from loyalty.simulate import (
    EVENT_MIX,
    BadSimulationConfig,
    EventFactory,
    Simulation,
    SimulationConfig,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_batches_are_valid_for_the_api() -> None:
    batch = EventFactory(100, "run1").batch(0, 0, 500, NOW)
    parsed = Batch.model_validate(batch)
    assert len(parsed.events) == 500
    assert len({e.event_id for e in parsed.events}) == 500
    for event in parsed.events:
        assert NOW - timedelta(seconds=30) <= event.occurred_at <= NOW


def test_same_run_id_same_batch_and_batches_differ() -> None:
    a, b = EventFactory(100, "seed7"), EventFactory(100, "seed7")
    assert a.batch(3, 300, 100, NOW) == b.batch(3, 300, 100, NOW)
    assert a.batch(3, 300, 100, NOW) != a.batch(4, 400, 100, NOW)
    ids = [e["event_id"] for n in range(3) for e in a.batch(n, n * 10, 10, NOW)["events"]]
    assert len(set(ids)) == 30


def test_user_activity_is_skewed_and_types_follow_the_mix() -> None:
    factory = EventFactory(1000, "skew")
    events = [e for n in range(20) for e in factory.batch(n, n * 1000, 1000, NOW)["events"]]
    users = Counter(e["user_id"] for e in events)
    top_ten = sum(n for _, n in users.most_common(10))
    assert top_ten > 0.2 * len(events)  # uniform would give 1%
    assert users.most_common(1)[0][0] == "sim-user-000000"
    types = Counter(e["type"] for e in events)
    total = sum(w for _, w in EVENT_MIX)
    for event_type, weight in EVENT_MIX:
        assert abs(types[event_type] / len(events) - weight / total) < 0.02
    wins = [e for e in events if e["type"] == "played_game" and e["attributes"]["result"] == "win"]
    assert wins, "the default rules' multipliers get exercised"


@pytest.mark.parametrize(
    "config",
    [
        SimulationConfig(key="k", url="localhost:8000"),
        SimulationConfig(key="k", users=0),
        SimulationConfig(key="k", batch_size=0),
        SimulationConfig(key="k", rate=-1),
        SimulationConfig(key="k", duration=0),
        SimulationConfig(key=""),
    ],
)
def test_bad_configs_are_refused(config: SimulationConfig) -> None:
    with pytest.raises(BadSimulationConfig):
        Simulation(config)


def test_batch_count_covers_every_event() -> None:
    sim = Simulation(SimulationConfig(key="k", events=1001, batch_size=100))
    assert sim.batch_count == 11
