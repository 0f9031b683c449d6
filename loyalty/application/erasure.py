"""Forget-me: erase a member from every store, resumably, with a receipt.

A request is durable (its row keeps the user id only until it completes). Steps run in
order and each is idempotent, so a crash anywhere finishes on the next run:

1. ``marker``: a short-lived marker (salted hash of the user id, stream id, request
   time) makes every process drop the member's older ingress events, refuse commands on
   the account while it is being erased, and evict it from its caches.
2. ``settle``: wait until every process has re-read the markers (they do so every
   ``marker_refresh`` seconds), so no command that loaded the account before the marker
   can still save into it.
3. every registered location is erased (ingress rows, cap counters, the event stream,
   read models), then storage is vacuumed, then the request completes: the user id is
   blanked and the receipt keeps times and a count per location.

Events that occurred before the request and arrive later are dropped (the marker lives
as long as the retention window); activity after the request starts a fresh account.
"""

from __future__ import annotations

import logging
import threading
import time
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


@dataclass(frozen=True, slots=True)
class Marker:
    subject_hash: str
    member_id: str
    requested_at: datetime
    state: str


@dataclass(slots=True)
class ForgetRequest:
    request_id: str
    user_id: str | None
    status: str
    step: str | None
    requested_at: datetime
    completed_at: datetime | None
    erased: dict[str, int] = field(default_factory=dict)


class ErasureStore(Protocol):
    def subject_hash(self, user_id: str) -> str: ...
    def markers(self) -> list[Marker]: ...
    def put_marker(self, marker: Marker, expires_at: datetime) -> None: ...
    def create_request(self, user_id: str, requested_at: datetime) -> str: ...
    def get_request(self, request_id: str) -> ForgetRequest | None: ...
    def unfinished_requests(self) -> list[ForgetRequest]: ...
    def record_step(self, request_id: str, step: str, erased: dict[str, int]) -> None: ...
    def forget_subject(self, request_id: str) -> None: ...
    def complete(self, request_id: str, completed_at: datetime, erased: dict[str, int]) -> None: ...
    def erase_ingress(self, user_id: str, before: datetime) -> int: ...
    def erase_caps(self, user_id: str) -> int: ...
    def erase_stream(self, member_id: str) -> int: ...
    def erase_read_models(self, user_id: str) -> dict[str, int]: ...
    def erase_delivery(
        self, user_id: str, request_id: str, requested_at: datetime
    ) -> dict[str, int]: ...
    def vacuum(self) -> None: ...


class MarkerCache:
    """This process's view of the forget markers, re-read every ``refresh`` seconds."""

    def __init__(self, store: ErasureStore, refresh: float = 1.0) -> None:
        self._store = store
        self._refresh = refresh
        self._by_hash: dict[str, Marker] = {}
        self._by_member: dict[str, Marker] = {}
        self._expires = 0.0
        self._lock = threading.Lock()

    def _current(self) -> dict[str, Marker]:
        if time.monotonic() >= self._expires:
            with self._lock:
                if time.monotonic() >= self._expires:
                    markers = self._store.markers()
                    self._by_hash = {m.subject_hash: m for m in markers}
                    self._by_member = {m.member_id: m for m in markers}
                    self._expires = time.monotonic() + self._refresh
        return self._by_hash

    def any(self) -> bool:
        """Whether any member has a marker (most of the time: none)."""
        return bool(self._current())

    def invalidate(self) -> None:
        self._expires = 0.0

    def forgotten_at(self, user_id: str) -> datetime | None:
        """When a forget-me of ``user_id`` was requested (None if none is known)."""
        by_hash = self._current()
        if not by_hash:
            return None
        marker = by_hash.get(self._store.subject_hash(user_id))
        return marker.requested_at if marker else None

    def check_member(self, user_id: str) -> Marker | None:
        """Raise while the member is being erased; the marker when one is done."""
        if not self._current():
            return None
        marker = self._by_member.get(str(Member.create_id(user_id)))
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
    ) -> None:
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
        request_id = self._store.create_request(user_id, now)
        self._put_marker(user_id, now, ERASING)
        found = self._store.get_request(request_id)
        assert found is not None
        return found

    def _put_marker(self, user_id: str, requested_at: datetime, state: str) -> None:
        marker = Marker(
            self._store.subject_hash(user_id), str(Member.create_id(user_id)), requested_at, state
        )
        self._store.put_marker(marker, requested_at + self._marker_ttl)

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
            elif step == "settle":
                remaining = (request.requested_at + self._settle - self._clock()).total_seconds()
                if remaining > 0:
                    self._sleep(min(remaining, self._settle.total_seconds()))
            elif step == "ingress":
                erased["ingress_events"] = self._store.erase_ingress(
                    user_id, before=request.requested_at
                )
            elif step == "caps":
                erased["pipeline_caps"] = self._store.erase_caps(user_id)
            elif step == "event_store":
                erased["event_store"] = self._store.erase_stream(member_id)
                self._evict(user_id)
            elif step == "read_models":
                erased.update(self._store.erase_read_models(user_id))
            elif step == "delivery":  # events out (issue 17): dead letters, notices
                erased.update(
                    self._store.erase_delivery(user_id, request.request_id, request.requested_at)
                )
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


def erased_total(erased: dict[str, int]) -> int:
    return sum(erased.values())


__all__: Sequence[str] = ("ForgetService", "MarkerCache", "Marker", "ForgetRequest")
