"""Read models projected from the member event store, each event applied exactly once.

The projection polls the Members application's notification log from its tracking
position, maps a batch of notifications to row changes (balance deltas and statement
entries), and hands them to the store, which commits the rows *and* the new tracking
position in one transaction, on the condition that the tracking position is still the
one the batch started from. A crash before the commit loses nothing (the batch is read
again); a crash after it re-reads nothing; two runners cannot both apply a batch.

An event the projection cannot apply (its stream has no balance row, i.e. no ``Created``
event: an orphan left by an old forget-me race; or an event that does not decode) is
*quarantined*: recorded with its position, stream and error in the same transaction
as the batch and the new position, counted, logged once per stream, and passed over; the
projection goes on for everyone else. ``loyalty projections status`` and ``GET
/v1/pipeline`` show the quarantine; ``loyalty doctor --repair`` finishes erasing orphan
streams and clears their entries; ``loyalty projections rebuild`` starts it afresh.

Reading the log is gap-safe on both backends: on SQLite there is one writer at a time,
so rowid order is commit order; on PostgreSQL the library serializes inserts of stored
events with ``LOCK TABLE ... IN EXCLUSIVE MODE``, so once an id is visible every lower id
is committed or rolled back for good. Batches are read only up to the maximum id seen
before reading, and positions advance only to ids actually read.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from loyalty.application.accounts import Members
from loyalty.application.delivery.feed import TOMBSTONE, NotificationSelect, library_select
from loyalty.application.jobs import JobMetrics, JobRunner, job_metrics
from loyalty.application.reporting import AccountFact, account_facts
from loyalty.domain.member import account_events

log = logging.getLogger(__name__)

PROJECTION_NAME = "members"
"""The tracking name of the projection that owns member_balances and member_history."""

LEGACY_LOT = "0000-00"
"""The lot of currency from before lots were tracked (``loyalty.domain.expiry.LEGACY``)."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One statement line: a signed change of a member's account."""

    user_id: str
    position: int
    """The event's version in the member's stream (unique per member, stable)."""
    kind: str
    currency: int
    rank_points: int
    at: datetime
    ref: str | None
    reason: str | None = None
    """An adjustment's reason (None for every other kind)."""


HISTORY_KINDS = ("award", "spend", "refund", "adjustment", "expiry", "rank_changed")
"""Every kind of statement line the projection writes (the API schema's enum)."""


@dataclass(slots=True)
class BalanceChange:
    """The net change of one member's balance row within a batch."""

    user_id: str
    member_id: str
    created: bool
    """True when the member's Created event is in the batch (insert, not update)."""
    updated_at: datetime
    currency: int = 0
    rank_points: int = 0
    lifetime_currency: int = 0


@dataclass(frozen=True, slots=True)
class QuarantinedEvent:
    """An event the projection passed over because it could not apply it."""

    position: int
    member_id: str
    originator_version: int
    topic: str
    error: str


@dataclass(slots=True)
class ProjectedBatch:
    start: int
    """The tracking position the batch was read after."""
    end: int
    """The last notification id in the batch: the new tracking position."""
    balances: dict[str, BalanceChange] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    epoch: int = 0
    """The tracking epoch when the batch was read (forget-me bumps it)."""
    quarantined: list[QuarantinedEvent] = field(default_factory=list)
    """Events passed over, recorded with the batch."""
    facts: list[AccountFact] = field(default_factory=list)
    """What the batch adds to the daily account rollups (counted once: see
    ``loyalty.application.reporting``)."""
    ranks: dict[str, str | None] = field(default_factory=dict)
    """Per user id, the rank last recorded in the batch (``member_ranks``)."""
    lots: dict[tuple[str, str], bool] = field(default_factory=dict)
    """The expiry index (``member_lots``): per (user id, lot), True when currency was
    credited to the lot in the batch, False when the lot expired (last change wins)."""


class ProjectionMetrics(Protocol):
    """Where projection progress is recorded (implemented by ``loyalty.observability``)."""

    def projection_progress(self, name: str, *, position: int, head: int, applied: int) -> None: ...
    def projection_quarantined(self, name: str, count: int) -> None: ...


class ReadModelWriter(Protocol):
    def position(self, name: str) -> int: ...
    def epoch(self, name: str) -> int: ...
    def user_ids(self, member_ids: Collection[str]) -> Mapping[str, str]: ...
    def apply(self, name: str, batch: ProjectedBatch) -> bool: ...
    def reset(self, name: str) -> None: ...


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _quarantined(
    position: int, member_id: Any, version: Any, topic: str, exc: BaseException
) -> QuarantinedEvent:
    return QuarantinedEvent(
        position, str(member_id), int(version), topic, f"{type(exc).__name__}: {exc}"
    )


def history_position(version: int, part: int) -> int:
    """The statement position of part ``part`` of the stored event at ``version``: the
    version itself for an event standing for itself (part 0). The parts of an
    ``Enrolled`` (always version 1) that are lines: its award (part 1) at 0 and its
    rank change (part 2) at 1, so they keep the order the separate events had (award,
    then rank change) below the stream's next event (version 2); no stream has a
    version 0."""
    return version if part == 0 else version + part - 2


def project(
    start: int,
    notifications: Sequence[tuple[int, Any]],
    known_user_ids: Callable[[Collection[str]], Mapping[str, str]],
) -> ProjectedBatch:
    """Map ``(notification_id, domain_event)`` pairs, oldest first, to row changes. An
    event of a stream with no balance row (and no ``Created`` in the batch) is put in
    ``batch.quarantined`` instead."""
    batch = ProjectedBatch(start=start, end=notifications[-1][0] if notifications else start)
    # a stored Enrolled is read as the Created, Awarded (and RankChanged) it stands for
    events = [
        (position, part, e)
        for position, stored in notifications
        for part, e in enumerate(account_events(stored))
    ]
    created = {
        str(e.originator_id): str(e.user_id) for _, _, e in events if type(e).__name__ == "Created"
    }
    others = {str(e.originator_id) for _, _, e in events} - created.keys()
    users = {**known_user_ids(others), **created} if others else created
    for position, part, event in events:
        name = type(event).__name__
        member_id = str(event.originator_id)
        user_id = users.get(member_id)
        if user_id is None:
            batch.quarantined.append(
                QuarantinedEvent(
                    position,
                    member_id,
                    int(event.originator_version),
                    name,
                    f"LookupError: no balance row for member stream {member_id}",
                )
            )
            continue
        at = _utc(event.timestamp)
        change = batch.balances.get(member_id)
        if change is None:
            change = BalanceChange(user_id, member_id, created=name == "Created", updated_at=at)
            batch.balances[member_id] = change
        change.updated_at = at
        entry: tuple[str, int, int, str | None] | None = None
        reason: str | None = None
        if name == "Awarded":
            change.currency += event.currency
            change.lifetime_currency += event.currency
            change.rank_points += event.rank_points
            entry = ("award", event.currency, event.rank_points, event.award_id)
            credited = json.loads(event.lots) if event.lots is not None else {LEGACY_LOT: 1}
            for lot, amount in credited.items():
                if amount and event.currency:
                    batch.lots[(user_id, lot)] = True
        elif name == "Spent":
            change.currency -= event.amount
            entry = ("spend", -event.amount, 0, event.order_id)
        elif name == "Refunded":
            change.currency += event.amount
            entry = ("refund", event.amount, 0, event.order_id)
        elif name == "Adjusted":
            change.currency += event.currency
            change.lifetime_currency += event.currency
            change.rank_points += event.rank_points
            entry = ("adjustment", event.currency, event.rank_points, event.adjustment_id)
            reason = event.reason
            if event.currency > 0:
                batch.lots[(user_id, event.lot or LEGACY_LOT)] = True
        elif name == "CurrencyExpired":
            change.currency -= event.amount
            entry = ("expiry", -event.amount, 0, event.lot)
            batch.lots[(user_id, event.lot)] = False
        elif name == "RankChanged":
            entry = ("rank_changed", 0, 0, event.new)
            batch.ranks[user_id] = event.new
        elif name != "Created":
            log.warning("projection ignores unknown event type %s", name)
        if entry is not None:
            kind, currency, rank_points, ref = entry
            batch.history.append(
                HistoryEntry(
                    user_id,
                    history_position(int(event.originator_version), part),
                    kind,
                    currency,
                    rank_points,
                    at,
                    ref,
                    reason,
                )
            )
    return batch


class MemberProjection:
    """Catches the read models up with the Members notification log, batch by batch."""

    def __init__(
        self,
        members: Members,
        store: ReadModelWriter,
        *,
        name: str = PROJECTION_NAME,
        batch_size: int = 500,
        metrics: ProjectionMetrics | None = None,
        retry_errors: tuple[type[BaseException], ...] = (),
        select: NotificationSelect | None = None,
    ) -> None:
        """``select``: the log's read the ways out use (``adapters.event_store.
        notification_reader``); without it the library's."""
        self._select = select or library_select(members.recorder)
        self._retry_errors = retry_errors
        """Errors of the database being out of reach or busy: raised (the worker retries
        the batch). Any other error applying a batch is the batch's: see :meth:`step`."""
        self._members = members
        self._store = store
        self.name = name
        self.batch_size = batch_size
        self.metrics = metrics
        self._position: int | None = None
        self._logged: set[str] = set()  # streams whose quarantine was logged

    def head(self) -> int:
        """The newest notification id in the event store (0 when empty)."""
        return int(self._members.recorder.max_notification_id() or 0)

    def position(self) -> int:
        if self._position is None:
            self._position = self._store.position(self.name)
        return self._position

    def step(self) -> int:
        """Apply one batch; returns how many events it covered (0 when caught up)."""
        start = self.position()
        epoch = self._store.epoch(self.name)
        head = self.head()
        if head <= start:
            self._report(start, head, 0)
            return 0
        notifications = self._select(start, self.batch_size, head)
        if not notifications:
            self._report(start, head, 0)
            return 0
        mapper = self._members.mapper
        pairs: list[tuple[int, Any]] = []
        undecodable: list[QuarantinedEvent] = []
        for n in notifications:
            if n.topic == TOMBSTONE:  # SQLite: forget-me keeps the highest rowid taken
                continue
            try:
                pairs.append((n.id, mapper.to_domain_event(n)))
            except Exception as exc:  # recorded, counted and logged below: not hidden
                undecodable.append(
                    _quarantined(n.id, n.originator_id, n.originator_version, n.topic, exc)
                )
        end = notifications[-1].id
        try:
            batch = self._batch(start, end, epoch, pairs, undecodable)
            applied = self._store.apply(self.name, batch)
        except self._retry_errors:
            raise
        except Exception as exc:  # one event of the batch cannot be applied: find it
            log.warning(
                "projection %s: batch after %d failed (%s: %s); applying it event by event",
                self.name,
                start,
                type(exc).__name__,
                exc,
            )
            return self._step_singly(start, end, epoch, head, pairs, undecodable)
        if not applied:
            return self._moved()
        self._position = batch.end
        if batch.quarantined:
            self._quarantined(batch.quarantined)
        self._report(batch.end, head, len(pairs))
        return len(pairs) + len(undecodable)

    def _batch(
        self,
        start: int,
        end: int,
        epoch: int,
        pairs: Sequence[tuple[int, Any]],
        undecodable: Sequence[QuarantinedEvent],
    ) -> ProjectedBatch:
        batch = project(start, pairs, self._store.user_ids)
        passed_over = {q.position for q in batch.quarantined}
        batch.facts = account_facts([p for p in pairs if p[0] not in passed_over])
        batch.quarantined[:0] = undecodable
        batch.end = end
        batch.epoch = epoch
        return batch

    def _moved(self) -> int:
        log.warning("projection %s: tracking moved under us; re-reading", self.name)
        self._position = None
        return 0

    def _step_singly(
        self,
        start: int,
        end: int,
        epoch: int,
        head: int,
        pairs: Sequence[tuple[int, Any]],
        undecodable: Sequence[QuarantinedEvent],
    ) -> int:
        """Apply a failed batch one event at a time: an event whose mapping or rows fail
        (whatever the error, but the database's being out of reach) is quarantined in
        its own commit, with its error, and the projection goes on past it."""
        position, left, quarantined = start, list(undecodable), []
        for notification_id, event in pairs:
            passed = [q for q in left if q.position < notification_id]
            left = [q for q in left if q.position >= notification_id]
            try:
                batch = self._batch(
                    position, notification_id, epoch, [(notification_id, event)], passed
                )
                applied = self._store.apply(self.name, batch)
            except self._retry_errors:
                raise
            except Exception as exc:  # this event's: recorded, counted and logged below
                batch = ProjectedBatch(
                    start=position,
                    end=notification_id,
                    epoch=epoch,
                    quarantined=[
                        *passed,
                        _quarantined(
                            notification_id,
                            event.originator_id,
                            event.originator_version,
                            type(event).__name__,
                            exc,
                        ),
                    ],
                )
                applied = self._store.apply(self.name, batch)
            if not applied:
                return self._moved()
            position = self._position = notification_id
            quarantined.extend(batch.quarantined)
        if position != end or left:
            batch = ProjectedBatch(start=position, end=end, epoch=epoch, quarantined=left)
            if not self._store.apply(self.name, batch):
                return self._moved()
            quarantined.extend(left)
        self._position = end
        if quarantined:
            self._quarantined(quarantined)
        self._report(end, head, len(pairs))
        return len(pairs) + len(undecodable)

    def _quarantined(self, events: Sequence[QuarantinedEvent]) -> None:
        for q in events:
            if q.member_id not in self._logged:
                self._logged.add(q.member_id)
                log.error(
                    "projection %s quarantined event %d (stream %s, version %d, %s): %s; "
                    "it goes on without it (see `loyalty doctor`)",
                    self.name,
                    q.position,
                    q.member_id,
                    q.originator_version,
                    q.topic,
                    q.error,
                )
        if self.metrics is not None:
            self.metrics.projection_quarantined(self.name, len(events))

    def _report(self, position: int, head: int, applied: int) -> None:
        if self.metrics is not None:
            self.metrics.projection_progress(
                self.name, position=position, head=head, applied=applied
            )

    def catch_up(
        self,
        stop: threading.Event | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Apply batches until caught up (or ``stop`` is set); returns events applied.
        ``on_batch`` receives the new position after each batch."""
        total = 0
        while stop is None or not stop.is_set():
            try:
                done = self.step()
            except BaseException:
                self._position = None  # re-read the durable position after any failure
                raise
            if done == 0:
                break
            total += done
            if on_batch is not None:
                on_batch(self.position())
        return total

    def reset(self) -> None:
        """Empty the read models and the tracking position (for a rebuild)."""
        self._store.reset(self.name)
        self._position = None


class ProjectionWorker(JobRunner):
    """Runs a projection on the job runner while this process holds its lease: asked
    before the first batch and then every ``lease_retry_seconds`` (a lease dies with its
    database session); each batch is fenced anyway: it commits only if the tracking
    position is unmoved."""

    def __init__(
        self,
        projection: MemberProjection,
        *,
        try_lease: Callable[[], bool],
        retry_errors: tuple[type[BaseException], ...],
        poll_seconds: float = 0.2,
        lease_retry_seconds: float = 2.0,
        on_error: Callable[[], None] | None = None,
        metrics: JobMetrics | None = None,
    ) -> None:
        on_error = on_error or (lambda: None)  # e.g. drop dead pooled connections
        super().__init__(
            "projection",
            self._catch_up,
            interval=poll_seconds,
            try_lease=try_lease,
            lease_retry=lease_retry_seconds,
            retry_errors=retry_errors,
            on_failure=lambda _exc: on_error(),
            metrics=job_metrics(metrics, projection.metrics),
            logger=log,
        )
        self._projection = projection

    def _catch_up(self) -> None:
        self._projection.catch_up(self.stop_event)
