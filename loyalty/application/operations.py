"""How far the weighting pipeline has got (``GET /v1/pipeline`` and the console's
dashboard read this one query)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from loyalty.application.pending import Position


class PipelineProgress(Protocol):
    """The pipeline's checkpoints (``PipelineStore``)."""

    def positions(self) -> dict[int, Position]: ...
    def totals(self) -> tuple[int, int]: ...


class Quarantine(Protocol):
    """The read models' count of account events they passed over (``ReadModels``)."""

    def quarantined_count(self) -> int: ...


PendingCount = Callable[[dict[int, Position]], tuple[int, datetime | None]]
"""Ingress rows beyond the given positions: how many, and the oldest one's time."""


@dataclass(frozen=True)
class PipelineStatus:
    pending: int
    oldest_pending_age_s: float | None
    processed_total: int
    awards_total: int
    quarantined_events: int


class PipelineMonitor:
    def __init__(
        self,
        progress: PipelineProgress,
        pending: PendingCount,
        quarantine: Quarantine,
        clock: Callable[[], datetime],
    ) -> None:
        self._progress = progress
        self._pending = pending
        self._quarantine = quarantine
        self._clock = clock

    def status(self) -> PipelineStatus:
        """Events waiting (and the oldest one's age in seconds), processed, awarded,
        quarantined."""
        pending, oldest = self._pending(self._progress.positions())
        processed, awards = self._progress.totals()
        age = None
        if oldest is not None:
            age = max(0.0, round((self._clock() - oldest).total_seconds(), 3))
        return PipelineStatus(
            pending=pending,
            oldest_pending_age_s=age,
            processed_total=processed,
            awards_total=awards,
            quarantined_events=self._quarantine.quarantined_count(),
        )
