"""How far the weighting pipeline has got: the events still pending and the age of the
oldest (the worker's lag gauge), with the totals and the quarantine (``GET /v1/pipeline``
and the console's dashboard)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from loyalty.application.pending import Position


class PipelineProgress(Protocol):
    """The shards' checkpoints (``adapters/pipeline_store.py``)."""

    def positions(self) -> dict[int, Position]: ...
    def totals(self) -> tuple[int, int]:
        """(events processed, awards) over every shard."""
        ...


PendingCount = Callable[[Mapping[int, Position]], tuple[int, datetime | None]]
"""Ingress events after the given checkpoints (shards without one count from the start)
and when the oldest of them occurred (``adapters/ingress_log.py``)."""


@dataclass(frozen=True, slots=True)
class PipelineReport:
    pending: int
    oldest_pending_age_s: float | None
    processed_total: int
    awards_total: int
    quarantined_events: int


class PipelineStatus:
    def __init__(
        self,
        progress: PipelineProgress,
        pending: PendingCount,
        quarantined: Callable[[], int],
        clock: Callable[[], datetime],
    ) -> None:
        self._progress = progress
        self._pending = pending
        self._quarantined = quarantined
        self._clock = clock

    def backlog(self) -> tuple[int, float | None]:
        """Pending ingress events (all shards) and the age of the oldest, in seconds
        (the pipeline's ``LagProbe``)."""
        pending, oldest = self._pending(self._progress.positions())
        if oldest is None:
            return pending, None
        if oldest.tzinfo is None:  # SQLite gives naive UTC times back
            oldest = oldest.replace(tzinfo=UTC)
        return pending, max(0.0, (self._clock() - oldest).total_seconds())

    def report(self) -> PipelineReport:
        pending, age = self.backlog()
        processed, awards = self._progress.totals()
        return PipelineReport(
            pending=pending,
            oldest_pending_age_s=round(age, 3) if age is not None else None,
            processed_total=processed,
            awards_total=awards,
            quarantined_events=self._quarantined(),
        )
