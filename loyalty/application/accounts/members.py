"""The member accounts' event store application and what every account use case
shares: the erasure port, the optimistic-concurrency retry, the award command."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from uuid import UUID

from eventsourcing.application import (
    Application,
    ProcessingEvent,
)
from eventsourcing.persistence import IntegrityError, JSONTranscoder, Recording

from loyalty.application.transcodings import register_member_transcodings
from loyalty.domain.member import Member

log = logging.getLogger(__name__)
T = TypeVar("T")


# Keep each save small: the library's PostgreSQL pipeline mode hangs on saves of
# thousands of events, and a conflict redoes the whole group.
SAVE_GROUP = 200
PREFETCH_GROUP = 500
StreamLoader = Callable[[Sequence[UUID]], Sequence[Any]]
MAX_ATTEMPTS = 12


class MemberMarkers(Protocol):
    """Forget-me markers as the accounts see them (see ``loyalty.application.erasure``)."""

    def check_member(self, user_id: str) -> Any: ...
    def fence(self) -> int: ...
    def invalidate(self) -> None: ...
    def subscribe(self, listener: Callable[[Sequence[str] | None], None]) -> None: ...


class StreamErased(IntegrityError):
    """The event store refused a save into a member stream that is being or has been
    erased (raised by the insert itself, in its own transaction; see
    ``loyalty.adapters.event_recorder``). ``reason``:

    - ``erasing``: a forget-me of the member is under way;
    - ``fenced``: the member was erased after the caller read what it saves (its
      erasure generation is older than the marker's): read again;
    - ``gone``: the stream lacks the event just before the saved ones (a copy of an
      erased aggregate, or a copy ahead of the store): read again."""

    def __init__(self, reason: str, member_ids: Sequence[str]) -> None:
        super().__init__(f"member stream {reason}: {', '.join(member_ids)}")
        self.reason = reason
        self.member_ids = list(member_ids)


FENCE = "erasure_fence"
"""Keyword of ``Application.save`` passing the erasure generation to the insert."""


class Members(Application[UUID]):
    """The event store of member accounts (tables ``members_*`` / ``stored_*``).

    Snapshots (tables ``members_snapshots`` / ``stored_snapshots``): a save that records a
    member's event number k x ``SNAPSHOT_INTERVAL`` also stores a snapshot of that member,
    so a load reads the latest snapshot and at most about an interval of events after it
    (the library's repository does that whenever a snapshot store exists). The store is
    always on, so snapshots already taken are used even with the interval set to 0 (no
    new ones). Erasure deletes a member's snapshots with its events."""

    name = "Members"
    is_snapshotting_enabled = True
    SNAPSHOT_INTERVAL = "SNAPSHOT_INTERVAL"
    DEFAULT_SNAPSHOT_INTERVAL = 100

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        interval = self.env.get(self.SNAPSHOT_INTERVAL)
        self.snapshot_interval = (
            int(interval) if interval is not None else self.DEFAULT_SNAPSHOT_INTERVAL
        )

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        """The library's save, with the members' events collected directly. The library's
        ``ProcessingEvent.collect_events`` tells aggregates from events by isinstance
        checks against runtime-checkable Protocols, which Python 3.11 answers by walking
        the Protocol's attributes on every call: a quarter of a save's time (py-spy on
        ``pipeline_many_members``). Anything but members goes the library's way."""
        if not all(isinstance(obj, Member) for obj in objs):
            return super().save(*objs, **kwargs)
        processing_event: ProcessingEvent[UUID] = ProcessingEvent()
        for member in objs:
            processing_event.events.extend(member.collect_events())
            processing_event.aggregates[member.id] = member
        processing_event.saved_kwargs.update(kwargs)
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)
        return recordings

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        register_member_transcodings(transcoder)

    def _take_snapshots(self, processing_event: ProcessingEvent[UUID]) -> None:
        """The library's rule (snapshot when a saved event's version is a multiple of the
        interval), but each snapshot is of the saved aggregate itself, at its new
        version, instead of a re-read: its events were just recorded at exactly those
        versions (else the insert would have failed), so it *is* the recorded state.
        All the save's snapshots go in one insert."""
        interval = self.snapshot_interval
        if self.snapshots is None or interval <= 0:
            return
        due = {
            e.originator_id for e in processing_event.events if e.originator_version % interval == 0
        }
        snapshots = [
            Member.Snapshot.take(aggregate)
            for member_id in due
            if isinstance(aggregate := processing_event.aggregates.get(member_id), Member)
        ]
        if not snapshots:
            return
        try:
            self.snapshots.put(snapshots)
        except IntegrityError:
            # A snapshot at that version exists already (it can only hold the same state).
            log.debug("snapshot already stored for %d members", len(snapshots))


@dataclass(frozen=True, slots=True)
class AwardCommand:
    user_id: str
    award_id: str
    currency: int
    rank_points: int
    event_count: int
    rule_version: int


def with_retry(action: Callable[[], T], *, what: str) -> T:
    """Run get -> mutate -> save again after an optimistic-concurrency conflict, with
    randomized, growing backoff."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return action()
        except IntegrityError:
            if attempt == MAX_ATTEMPTS - 1:
                raise
            delay = random.uniform(0, 0.005 * 2**attempt)
            log.debug("conflict on %s, retry %d in %.3fs", what, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
