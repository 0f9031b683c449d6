"""Member accounts: the eventsourcing Application and the use cases on it."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from loyalty.domain.errors import MemberNotFound
from loyalty.domain.member import Member
from loyalty.domain.ranks import RankLadder

log = logging.getLogger(__name__)
T = TypeVar("T")

# Keep each save small: the library's PostgreSQL pipeline mode hangs on saves of
# thousands of events, and a conflict redoes the whole group.
SAVE_GROUP = 200
MAX_ATTEMPTS = 12


class Members(Application[UUID]):
    """The event store of member accounts (tables ``members_*`` / ``stored_*``)."""

    name = "Members"


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


class Accounts:
    """Use cases on member accounts. Decisions always read the aggregate.

    The event store application is built on first use, so a process can start (and
    answer /healthz) while its database is still down."""

    def __init__(self, app: Members | Callable[[], Members]) -> None:
        self._app = app if isinstance(app, Members) else None
        self._factory = app if not isinstance(app, Members) else None
        self._lock = threading.Lock()

    @property
    def app(self) -> Members:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    assert self._factory is not None
                    self._app = self._factory()
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()

    def _load(self, user_id: str) -> Member | None:
        try:
            member: Member = self.app.repository.get(Member.create_id(user_id))
        except AggregateNotFoundError:
            return None
        return member

    def _evict(self, user_ids: Sequence[str]) -> None:
        cache = self.app.repository.cache
        if cache is not None:
            for user_id in user_ids:
                cache.put(Member.create_id(user_id), None)

    def get(self, user_id: str) -> Member:
        member = self._load(user_id)
        if member is None:
            raise MemberNotFound()
        return member

    def award_many(self, commands: Sequence[AwardCommand], ranks: RankLadder) -> int:
        """Apply awards (each idempotent by award id), saving in small groups.
        Returns how many were new."""
        applied = 0
        for start in range(0, len(commands), SAVE_GROUP):
            group = commands[start : start + SAVE_GROUP]
            applied += with_retry(lambda g=group: self._award_group(g, ranks), what="awards")  # type: ignore[misc]
        return applied

    def _award_group(self, group: Sequence[AwardCommand], ranks: RankLadder) -> int:
        members: list[Any] = []
        applied = 0
        for cmd in group:
            member = self._load(cmd.user_id) or Member(user_id=cmd.user_id)
            if member.award(
                cmd.award_id,
                cmd.currency,
                cmd.rank_points,
                cmd.event_count,
                cmd.rule_version,
                ranks,
            ):
                applied += 1
                members.append(member)
        if members:
            try:
                self.app.save(*members)
            except IntegrityError:
                self._evict([m.user_id for m in members])
                raise
        return applied
