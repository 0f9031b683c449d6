"""Forget-me: erase a member from every store, resumably, with a receipt.

A request is durable (its row keeps the user id only until it completes). Steps run in
order and each is idempotent, so a crash anywhere finishes on the next run:

1. ``marker``: a short-lived marker (salted hash of the user id, stream id, request
   time, and the erasure generation it was set at) makes every process drop the
   member's older ingress events, refuse commands on the account while it is being
   erased, and evict it from its caches (each process re-reads the markers every
   ``marker_refresh`` seconds and evicts every member whose marker appeared or changed).
   It is written in the request's own transaction.
2. ``settle``: politeness only: give commands already running the time to finish
   before the deletion (they would be refused otherwise). Correctness does not depend
   on it: the event insert itself refuses, in its own transaction, any write into a
   stream that is being erased, that lacks the event before the written ones (a stale
   copy of an erased account), or whose marker is newer than the markers the command
   read before loading (``loyalty.adapters.event_recorder``); the deletion takes a lock
   that conflicts with the insert's, so one always sees the other.
3. every registered location is erased, step by step (``ERASING_STEPS``: ingress rows,
   cap counters and pending earnings, the event stream, read models, events out): each
   store owns the erasure of its rows and registers it (``ErasureStore.locations``,
   built in ``loyalty.adapters.erasure_store``), then storage is vacuumed, then the
   request completes: the user id is blanked and the receipt keeps times and a count
   per location.

Events that occurred before the request and arrive later are dropped (the marker lives
as long as the retention window); activity after the request starts a fresh account.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from loyalty.domain.errors import MemberBeingErased
from loyalty.domain.member import Member

log = logging.getLogger(__name__)

ERASING, DONE = "erasing", "done"
STEPS = (
    "marker",
    "settle",
    "ingress",
    "caps",
    "event_store",
    "read_models",
    "delivery",
    "marker_done",
    "subject",
    "vacuum",
    "done",
)
ERASING_STEPS = ("ingress", "caps", "event_store", "read_models", "delivery")
"""The steps that erase the registered locations (``ErasureStore.locations``)."""


FORGET_STATUSES = ("pending", "running", "completed")
"""A forget request's statuses, in order (``adapters/erasure_store.py`` writes them)."""


@dataclass(frozen=True, slots=True)
class Marker:
    subject_hash: str
    member_id: str
    requested_at: datetime
    state: str
    seq: int = 0
    """The erasure generation it was set at (``erasing``); 0 when not known."""


@dataclass(slots=True)
class ForgetRequest:
    request_id: str
    user_id: str | None
    status: str
    step: str | None
    requested_at: datetime
    completed_at: datetime | None
    erased: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Subject:
    """The member a forget-me request erases."""

    request_id: str
    user_id: str
    member_id: str
    requested_at: datetime


@dataclass(frozen=True, slots=True)
class Location:
    """One store's erasure of a member's rows: run in ``step`` (one of ``STEPS``), in
    its own transaction(s); returns the receipt's counts by key."""

    key: str
    step: str
    erase: Callable[[Subject], dict[str, int]]


class ErasureStore(Protocol):
    def subject_hash(self, user_id: str) -> str: ...
    def generation(self) -> int: ...
    def markers(self) -> list[Marker]: ...
    def put_marker(self, marker: Marker, expires_at: datetime) -> None: ...
    def create_request(
        self, user_id: str, requested_at: datetime, marker: Marker, expires_at: datetime
    ) -> str: ...
    def get_request(self, request_id: str) -> ForgetRequest | None: ...
    def unfinished_requests(self) -> list[ForgetRequest]: ...
    def recent_requests(self, limit: int) -> list[ForgetRequest]: ...
    def record_step(self, request_id: str, step: str, erased: dict[str, int]) -> None: ...
    def forget_subject(self, request_id: str) -> None: ...
    def complete(self, request_id: str, completed_at: datetime, erased: dict[str, int]) -> None: ...
    def locations(self) -> Sequence[Location]:
        """Every store's erasure of a member, in the order they run within a step."""
        ...

    def vacuum(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Snapshot:
    generation: int
    by_hash: dict[str, Marker]
    by_member: dict[str, Marker]


class MarkerCache:
    """This process's view of the forget markers, re-read every ``refresh`` seconds.

    Each read takes the erasure generation first, then the markers (so every marker set
    at or before that generation is in the view). A thread's last answer remembers the
    generation it came from (``fence``): a save passes it to the event insert, which
    refuses a stream whose marker is newer. Subscribers (the accounts' caches) hear of
    every member whose marker appeared, changed state or went away; and of everyone
    (``None``) when the generation moved past markers this process never saw (they
    expired before it looked: an idle process's cache may hold an erased account)."""

    def __init__(self, store: ErasureStore, refresh: float = 1.0) -> None:
        self._store = store
        self._refresh = refresh
        self._snapshot: _Snapshot | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self._seen = threading.local()
        self._listeners: list[weakref.WeakMethod[Callable[[Sequence[str] | None], None]]] = []

    def subscribe(self, listener: Callable[[Sequence[str] | None], None]) -> None:
        """Call the bound method ``listener`` with the stream ids whose markers changed
        (held weakly: a subscriber that goes away is dropped)."""
        self._listeners.append(weakref.WeakMethod(listener))

    def _current(self) -> _Snapshot:
        if time.monotonic() >= self._expires:
            with self._lock:
                if time.monotonic() >= self._expires:
                    self._reload()
        snapshot = self._snapshot
        assert snapshot is not None
        self._seen.generation = snapshot.generation
        return snapshot

    def _reload(self) -> None:
        generation = self._store.generation()
        markers = self._store.markers()
        new = {m.member_id: m for m in markers}
        changed: list[str] | None = None  # None: evict everyone
        if self._snapshot is not None:
            old = self._snapshot.by_member
            changed = sorted(
                m
                for m in old.keys() | new.keys()
                if (old.get(m) and (old[m].state, old[m].requested_at))
                != (new.get(m) and (new[m].state, new[m].requested_at))
            )
            seen = {m.seq for m in markers if self._snapshot.generation < m.seq <= generation}
            if len(seen) < generation - self._snapshot.generation:
                changed = None  # erasures this process never saw the markers of
        if changed is None or changed:  # evict before anyone answers from the new view
            for ref in list(self._listeners):
                listener = ref()
                if listener is None:
                    self._listeners.remove(ref)
                else:
                    listener(changed)
        self._snapshot = _Snapshot(generation, {m.subject_hash: m for m in markers}, new)
        self._expires = time.monotonic() + self._refresh

    def fence(self) -> int:
        """The erasure generation of this thread's last answer (the current one if none)."""
        seen = getattr(self._seen, "generation", None)
        if seen is None:
            self._current()
            seen = self._seen.generation
        return int(seen)

    def any(self) -> bool:
        """Whether any member has a marker (most of the time: none)."""
        return bool(self._current().by_hash)

    def invalidate(self) -> None:
        self._expires = 0.0

    def forgotten_at(self, user_id: str) -> datetime | None:
        """When a forget-me of ``user_id`` was requested (None if none is known)."""
        by_hash = self._current().by_hash
        if not by_hash:
            return None
        marker = by_hash.get(self._store.subject_hash(user_id))
        return marker.requested_at if marker else None

    def check_member(self, user_id: str) -> Marker | None:
        """Raise while the member is being erased; the marker when one is done."""
        snapshot = self._current()
        if not snapshot.by_hash:
            return None
        marker = snapshot.by_member.get(str(Member.create_id(user_id)))
        if marker is not None and marker.state == ERASING:
            raise MemberBeingErased()
        return marker


class ForgetService:
    def __init__(
        self,
        store: ErasureStore,
        *,
        clock: Callable[[], datetime],
        marker_ttl: timedelta,
        settle: timedelta,
        evict: Callable[[str], None] = lambda _user_id: None,
        crash_hook: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        markers_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._markers_changed = markers_changed
        self._store = store
        self._clock = clock
        self._marker_ttl = marker_ttl
        self._settle = settle
        self._evict = evict
        self._crash_hook = crash_hook or (lambda _step: None)
        self._sleep = sleep

    def request(self, user_id: str) -> ForgetRequest:
        """Record the request and its marker at once (ingress drops the member's older
        events from now on); the erasure itself runs in the worker."""
        now = self._clock()
        marker = self._marker(user_id, now, ERASING)
        request_id = self._store.create_request(user_id, now, marker, now + self._marker_ttl)
        self._markers_changed()
        found = self._store.get_request(request_id)
        assert found is not None
        return found

    def _marker(self, user_id: str, requested_at: datetime, state: str) -> Marker:
        return Marker(
            self._store.subject_hash(user_id), str(Member.create_id(user_id)), requested_at, state
        )

    def _put_marker(self, user_id: str, requested_at: datetime, state: str) -> None:
        marker = self._marker(user_id, requested_at, state)
        self._store.put_marker(marker, requested_at + self._marker_ttl)
        self._markers_changed()  # this process's caches see it now

    def run_pending(self) -> int:
        """Carry out every unfinished request; returns how many completed."""
        done = 0
        for request in self._store.unfinished_requests():
            self.execute(request)
            done += 1
        return done

    def execute(self, request: ForgetRequest) -> None:
        erased = dict(request.erased)
        start = STEPS.index(request.step) + 1 if request.step in STEPS else 0
        user_id = request.user_id or ""  # deleted by the "subject" step
        member_id = str(Member.create_id(user_id))
        for step in STEPS[start:]:
            # The "subject" step deletes the user id: a crash right after it (before it
            # was recorded) resumes at "subject" again, with the id already gone.
            if step in STEPS[: STEPS.index("subject")]:
                assert user_id, "the user id is kept until the subject step"
            if step == "marker":
                self._put_marker(user_id, request.requested_at, ERASING)
            elif step == "settle":  # politeness: see the module's docstring
                remaining = (request.requested_at + self._settle - self._clock()).total_seconds()
                if remaining > 0:
                    self._sleep(min(remaining, self._settle.total_seconds()))
            elif step in ERASING_STEPS:  # every registered location of the step
                subject = Subject(request.request_id, user_id, member_id, request.requested_at)
                for location in self._store.locations():
                    if location.step == step:
                        erased.update(location.erase(subject))
                if step == "event_store":  # no cached copy of the account may write back
                    self._evict(user_id)
                    self._markers_changed()
            elif step == "marker_done":
                self._put_marker(user_id, request.requested_at, DONE)
            elif step == "subject":
                self._store.forget_subject(request.request_id)
            elif step == "vacuum":  # last: after every deletion, including the subject's
                self._store.vacuum()
            elif step == "done":
                self._store.complete(request.request_id, self._clock(), erased)
                log.info("forget request %s completed", request.request_id)
                return
            self._store.record_step(request.request_id, step, erased)
            self._crash_hook(step)

    def status(self, request_id: str) -> ForgetRequest | None:
        return self._store.get_request(request_id)

    def recent(self, limit: int = 20) -> list[ForgetRequest]:
        """The newest requests, newest first (receipts: show no user id from them)."""
        return self._store.recent_requests(limit)


def erased_total(erased: dict[str, int]) -> int:
    return sum(erased.values())


__all__: Sequence[str] = ("ForgetService", "MarkerCache", "Marker", "ForgetRequest")
