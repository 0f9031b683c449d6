"""The accounts: loading, saving and folding pending earnings into member aggregates
(batched for the pipeline, one at a time for the API); awards in groups."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.application import (
    AggregateNotFoundError,
    Cache,
    LRUCache,
)

from loyalty.application.accounts.members import (
    FENCE,
    PREFETCH_GROUP,
    SAVE_GROUP,
    AwardCommand,
    MemberMarkers,
    Members,
    StreamErased,
    StreamLoader,
    with_retry,
)
from loyalty.application.pending import (
    EXPLAINED,
    PENDING,
    PendingRow,
    PendingStore,
    award_id_for,
)
from loyalty.domain.errors import MemberBeingErased, MemberNotFound
from loyalty.domain.expiry import month_of
from loyalty.domain.member import Member
from loyalty.domain.ranks import RankLadder


def _explained(
    members: Sequence[Member], rows: Mapping[str, PendingRow]
) -> list[tuple[str, int, int, str, int, int, str, str]]:
    """For each pending row a save records: the ``Awarded`` that records it (what its
    explanation is stored with, see ``EXPLAINED``)."""
    out = []
    for member in members:
        row = rows.get(member.user_id)
        if row is None:
            continue
        award_id = award_id_for(row.shard, row.upto)
        for event in member.pending_events:
            if isinstance(event, Member.Awarded) and event.award_id == award_id:
                out.append(
                    (
                        member.user_id,
                        row.upto[0],
                        row.upto[1],
                        award_id,
                        event.currency,
                        event.rank_points,
                        event.fraction_currency,
                        event.fraction_rank_points,
                    )
                )
    return out


class Accounts:
    """Use cases on member accounts. Decisions always read the aggregate.

    The event store application is built on first use, so a process can start (and
    answer /healthz) while its database is still down."""

    def __init__(
        self,
        app: Members | Callable[[], Members],
        stream_loader: Callable[[Members], StreamLoader] | None = None,
        markers: MemberMarkers | None = None,
        pending: PendingStore | None = None,
    ) -> None:
        self.markers = markers
        self.pending = pending
        self._app = app if isinstance(app, Members) else None
        self._factory = app if not isinstance(app, Members) else None
        self._lock = threading.Lock()
        self._stream_loader_factory = stream_loader
        self._stream_loader: StreamLoader | None = None
        # Members the last prefetch found no stream for (new accounts): no read needed.
        self._absent: set[UUID] = set()
        if markers is not None:
            # every marker this process sees appear or change (erasing, done, expired)
            # evicts the member's cached copy: no process serves an erased account
            markers.subscribe(self._evict_streams)

    def fence(self) -> int | None:
        """The erasure generation this thread last read the markers at (before loading
        what it saves): the insert refuses streams whose marker is newer."""
        return self.markers.fence() if self.markers is not None else None

    def save(
        self,
        *members: Member,
        fence: int | None,
        consumed: Iterable[PendingRow] = (),
    ) -> None:
        """Save, deleting the ``consumed`` pending rows in the same transaction (only if
        unchanged since read, else :class:`PendingMoved` and nothing is saved)."""
        rows = {row.user_id: row for row in consumed}
        revisions = {user_id: row.upto for user_id, row in rows.items()}
        if revisions:
            self.app.save(
                *members,
                **{FENCE: fence, PENDING: revisions, EXPLAINED: _explained(members, rows)},
            )
        else:
            self.app.save(*members, **{FENCE: fence})

    def pending_of(self, user_id: str) -> PendingRow | None:
        """The member's pending row, if any (None without a pending store)."""
        if self.pending is None:
            return None
        return self.pending.one(user_id)

    @staticmethod
    def fold(member: Member, row: PendingRow | None, ranks: RankLadder) -> bool:
        """Record ``row`` on ``member`` (one ``Awarded``, plus ``RankChanged`` if it lifts
        the rank). False when there is nothing to record."""
        if row is None:
            return False
        return member.record_pending(
            award_id_for(row.shard, row.upto),
            row.currency,
            row.rank_points,
            row.event_count,
            row.rule_version,
            ranks,
            months=row.months,
            month=month_of(row.since),
            on=row.since.astimezone(UTC).date().isoformat(),
        )

    def with_pending(self, member: Member, ranks: RankLadder) -> Member:
        """What ``member`` holds once its pending earnings are recorded: a copy with the
        pending row folded in exactly as a spend, refund, adjustment or the expiry job
        records it (:meth:`fold`). The member view reads its balance from this copy and a
        spend decides on the same fold, so "spendable" is one computation: currency
        earned in a month whose lot has expired expires at recording, so it is never
        shown (see docs/architecture.md, "Currency expiry")."""
        # the view's read is on the event store's pool; a command's (``pending_of``) stays
        # off it: there saves hold connections while they wait for the insert's lock
        pending = self.pending
        row = pending.one(member.user_id, beside_stream=True) if pending is not None else None
        if row is None:
            return member
        folded = copy.deepcopy(member)
        return folded if self.fold(folded, row, ranks) else member

    def record_pending(
        self,
        user_ids: Sequence[str],
        ranks: RankLadder,
        rows: Mapping[str, PendingRow] | None = None,
        *,
        prefetched: bool = False,
    ) -> int:
        """Record the pending rows of ``user_ids`` (those that exist), each as one award,
        in groups; each group's save deletes the rows it recorded. ``rows``: as just read
        (a first attempt uses them; a retry reads again). Returns how many awards were
        recorded."""
        if self.pending is None or not user_ids:
            return 0
        recorded = 0
        fence = self.fence()
        if not prefetched:
            self.prefetch(list(user_ids))
        for start in range(0, len(user_ids), SAVE_GROUP):
            group = list(user_ids[start : start + SAVE_GROUP])
            first: list[Mapping[str, PendingRow] | None] = [
                None if rows is None else {u: rows[u] for u in group if u in rows}
            ]

            def attempt(g: list[str] = group, known: list[Any] = first) -> int:
                given, known[0] = known[0], None  # a retry reads the rows again
                return self._record_group(g, ranks, fence, given)

            recorded += with_retry(attempt, what="pending")
        return recorded

    def settle_pending(self, rows: Sequence[PendingRow], ranks: RankLadder) -> int:
        """For rows just created or grown (as the pipeline's commit wrote them): record
        those of members without an account or whose pending reaches their next rank;
        note the rank need of the others. Returns how many awards were recorded.

        In slices of half the aggregate cache: what a slice prefetches is still cached
        when it is read (a window's rows of 400k members, prefetched at once into a cache
        of 10k, were read again one stream at a time: 300k single reads)."""
        if self.pending is None or not rows:
            return 0
        maxsize = getattr(self.app.repository.cache, "maxsize", None)
        step = max(1, maxsize // 2) if maxsize else len(rows)
        return sum(self._settle(rows[i : i + step], ranks) for i in range(0, len(rows), step))

    def _settle(self, rows: Sequence[PendingRow], ranks: RankLadder) -> int:
        assert self.pending is not None
        now: list[str] = []
        needs: list[tuple[str, tuple[int, int], Decimal | None]] = []
        unknown = [row for row in rows if row.rank_need is None]
        if unknown:
            self.prefetch([row.user_id for row in unknown])
        for row in rows:
            if row.rank_need is None:
                # the prefetch found no stream: no account yet (no read per member)
                absent = Member.create_id(row.user_id) in self._absent
                member = None if absent else self._load(row.user_id)
                if member is None:
                    now.append(row.user_id)
                    continue
                need = member.rank_need(ranks, row.since.astimezone(UTC).date())
                if need is not None and row.rank_points >= need:
                    now.append(row.user_id)
                else:
                    needs.append((row.user_id, row.upto, need))
            elif row.lifts_rank():
                now.append(row.user_id)
        self.pending.set_needs(needs)
        by_user = {row.user_id: row for row in rows}
        return self.record_pending(now, ranks, by_user, prefetched=bool(unknown))

    def _record_group(
        self,
        group: Sequence[str],
        ranks: RankLadder,
        fence: int | None,
        given: Mapping[str, PendingRow] | None = None,
    ) -> int:
        assert self.pending is not None
        # as just read, or read now: the insert checks the revision either way
        rows = dict(given) if given is not None else self.pending.load(group)
        members: dict[str, Member] = {}
        consumed: list[PendingRow] = []
        for user_id, row in rows.items():
            member_id = Member.create_id(user_id)
            if member_id in self._absent:
                self._absent.discard(member_id)
                member: Member | None = Member(user_id=user_id)
            else:
                member = self._load(user_id) or Member(user_id=user_id)
            assert member is not None
            if self.fold(member, row, ranks):
                members[user_id] = member
                consumed.append(row)
            else:  # recorded already (a window awarded by a version before pending)
                self.pending.discard(user_id, row.upto)
        if members:
            try:
                self.save(*members.values(), fence=fence, consumed=consumed)
            except StreamErased as exc:
                self._evict(list(members))
                self.refused(exc)
                if exc.reason == "fenced":
                    raise MemberBeingErased() from exc
                raise
            except Exception:
                # the cache's copies are ahead of the store: evict them (see _award_group)
                self._evict(list(members))
                raise
        return len(members)

    def refused(self, exc: StreamErased) -> None:
        """After the store refused a save: forget the cached copies and re-read the
        markers; while the erasure runs, the member answers as being erased."""
        self._evict_streams(exc.member_ids)
        if self.markers is not None:
            self.markers.invalidate()
        if exc.reason == "erasing":
            raise MemberBeingErased() from exc

    def _evict_streams(self, member_ids: Sequence[str] | None) -> None:
        """Evict these streams from the cache (None: empty the cache)."""
        if self._app is None:  # nothing cached yet
            return
        repository = self._app.repository
        cache = repository.cache
        if cache is None:
            return
        if member_ids is None:
            maxsize = getattr(cache, "maxsize", None)
            repository.cache = LRUCache(maxsize) if maxsize else Cache()
            return
        if cache is not None:
            for member_id in member_ids:
                with contextlib.suppress(KeyError, ValueError):
                    cache.get(UUID(member_id), evict=True)

    def prefetch(self, user_ids: Sequence[str]) -> None:
        """Load the members not in the cache with a few bulk reads instead of one read
        each (only when a bulk stream loader was given and the cache is on)."""
        if self.app.repository.cache is None or self._stream_loader_factory is None:
            return
        if self.markers is not None:
            # The markers' first read in this process replaces the cache (it cannot know
            # what changed before it): take it before loading, not at the first get after,
            # or the first page loaded is dropped and read again one member at a time.
            self.markers.fence()
        cache = self.app.repository.cache
        if self._stream_loader is None:
            self._stream_loader = self._stream_loader_factory(self.app)
        missing = []
        for user_id in user_ids:
            member_id = Member.create_id(user_id)
            try:
                cache.get(member_id)
            except KeyError:
                missing.append(member_id)
        self._absent = set(missing)
        for start in range(0, len(missing), PREFETCH_GROUP):
            stored = self._stream_loader(missing[start : start + PREFETCH_GROUP])
            self._absent.difference_update(item.originator_id for item in stored)
            member: Any = None
            for item in stored:
                if member is not None and member.id != item.originator_id:
                    cache.put(member.id, member)
                    member = None
                member = self.app.mapper.to_domain_event(item).mutate(member)  # type: ignore[attr-defined]
            if member is not None:
                cache.put(member.id, member)

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
        marker = self.markers.check_member(user_id) if self.markers else None
        try:
            member: Member = self.app.repository.get(Member.create_id(user_id))
        except AggregateNotFoundError:
            return None
        if marker is not None and member.created_on < marker.requested_at:
            # a cached copy of an account erased since: forget it, read the store again
            self._evict([user_id])
            try:
                member = self.app.repository.get(Member.create_id(user_id))
            except AggregateNotFoundError:
                return None
        return member

    def evict(self, user_id: str) -> None:
        self._evict([user_id])

    def _evict(self, user_ids: Sequence[str]) -> None:
        cache = self.app.repository.cache
        if cache is not None:
            for user_id in user_ids:
                with contextlib.suppress(KeyError):
                    cache.get(Member.create_id(user_id), evict=True)

    def get(self, user_id: str) -> Member:
        member = self._load(user_id)
        if member is None:
            raise MemberNotFound()
        return member

    def award_many(self, commands: Sequence[AwardCommand], ranks: RankLadder) -> int:
        """Apply awards (each idempotent by award id), saving in small groups.
        Returns how many were new."""
        applied = 0
        # The generation the caller (the pipeline) filtered its events with: a member
        # erased since must not receive them (the window fails and is read again).
        fence = self.fence()
        self.prefetch([c.user_id for c in commands])
        for start in range(0, len(commands), SAVE_GROUP):
            group = commands[start : start + SAVE_GROUP]
            applied += with_retry(
                lambda g=group: self._award_group(g, ranks, fence),  # type: ignore[misc]
                what="awards",
            )
        return applied

    def _award_group(
        self, group: Sequence[AwardCommand], ranks: RankLadder, fence: int | None
    ) -> int:
        members: dict[str, Any] = {}  # a member twice in a group is loaded once
        applied = 0
        for cmd in group:
            member_id = Member.create_id(cmd.user_id)
            if cmd.user_id in members:
                member = members[cmd.user_id]
            elif member_id in self._absent:
                self._absent.discard(member_id)  # if it exists after all, save conflicts
                member = Member(user_id=cmd.user_id)
            else:
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
                members[cmd.user_id] = member
        if members:
            try:
                self.save(*members.values(), fence=fence)
            except StreamErased as exc:
                self._evict(list(members))
                self.refused(exc)  # raises MemberBeingErased while erasing
                if exc.reason == "fenced":  # the window predates the erasure: read it again
                    raise MemberBeingErased() from exc
                raise  # gone: retried from a fresh read of the store
            except Exception:
                # The worker's cache hands out its own copies (no deep copy): a save that
                # failed for any reason (a conflict, or the database gone mid-commit)
                # leaves them ahead of the store. Evict them, or the retried window would
                # find its award ids "seen" (a lost award) and the next save would leave
                # a gap in the stream (an unreadable account).
                self._evict(list(members))
                raise
        return applied
