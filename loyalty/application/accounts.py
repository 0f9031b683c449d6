"""Member accounts: the eventsourcing Application and the use cases on it."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar
from uuid import UUID

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    Cache,
    LRUCache,
    ProcessingEvent,
)
from eventsourcing.persistence import IntegrityError, JSONTranscoder

from loyalty.application.pending import (
    EXPLAINED,
    PENDING,
    PendingRow,
    PendingStore,
    award_id_for,
)
from loyalty.application.transcodings import register_member_transcodings
from loyalty.domain.errors import DomainError, MemberBeingErased, MemberNotFound
from loyalty.domain.expiry import CurrencyExpiry, month_of
from loyalty.domain.member import Member, scoped_key
from loyalty.domain.ranks import RankLadder

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
        return self.pending.load([user_id]).get(user_id)

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
        row = self.pending_of(member.user_id)
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
        note the rank need of the others. Returns how many awards were recorded."""
        if self.pending is None or not rows:
            return 0
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
        cache = self.app.repository.cache
        if cache is None or self._stream_loader_factory is None:
            return
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


# ---------------------------------------------------------------- spending use cases


@dataclass(frozen=True, slots=True)
class OrderResult:
    """The answer to a spend or refund: the order, its amount and the balance right
    after it (the same on every replay of the command)."""

    order_id: str
    amount: int
    currency: int
    # True: the command was done by an earlier request; this is that request's answer
    # (``currency`` is the balance right after it, not now)
    replayed: bool = False


class SpendingMetrics(Protocol):
    """Where account commands are counted (implemented by ``loyalty.observability``).
    ``outcome`` is ``applied``, ``replayed`` or a domain error code."""

    def account_command(self, command: str, outcome: str, amount: int) -> None: ...


APPLIED = "applied"
REPLAYED = "replayed"


def _is(domain_event: Any, name: str) -> bool:
    return type(domain_event).__name__ == name


class Spending:
    """Spend, refund and adjust on member accounts. Every decision reads the aggregate
    (never a projection); a conflicting concurrent save is retried from a fresh read.

    A replayed command answers exactly as the first time: the balance is the one right
    after the original event, found by replaying the member's stream up to it."""

    LOCK_STRIPES = 256

    def __init__(
        self,
        accounts: Accounts,
        metrics: SpendingMetrics | None = None,
        ranks: Callable[[], RankLadder] | None = None,
        expiry: Callable[[], CurrencyExpiry | None] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._accounts = accounts
        # the current rank ladder: a recording of pending earnings records rank changes
        self._ranks = ranks or (lambda: RankLadder())
        # the current expiry rule (a refund into an expired lot expires at once) and the
        # clock (the month an adjustment's currency is earned in; the refund's "now")
        self._expiry = expiry or (lambda: None)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._metrics = metrics
        # Commands on one member from this process's threads queue on a striped lock
        # instead of racing to save the same version: without it a hot member under
        # many concurrent spends can exhaust the optimistic retries. Conflicts with
        # other processes (and the pipeline's awards) are still retried.
        self._stripes = [threading.Lock() for _ in range(self.LOCK_STRIPES)]

    def _locked(self, user_id: str, action: Callable[[], T]) -> Callable[[], T]:
        """Run ``action`` under the member's stripe lock. A save the store refused
        because the member is being erased answers as being erased; one refused because
        it was erased (a stale copy) is read again from the store (by ``with_retry``):
        the same answer as a command arriving after the erasure."""
        lock = self._stripes[hash(user_id) % self.LOCK_STRIPES]

        def run() -> T:
            with lock:
                try:
                    return action()
                except StreamErased as exc:
                    self._accounts.refused(exc)
                    raise

        return run

    @property
    def app(self) -> Members:
        return self._accounts.app

    def _observed(self, command: str, run: Callable[[], tuple[T, str, int]]) -> T:
        """Run a command, counting its outcome (applied, replayed, error code)."""
        if self._metrics is None:
            return run()[0]
        try:
            result, outcome, amount = run()
        except DomainError as exc:
            self._metrics.account_command(command, exc.code, 0)
            raise
        except Exception:
            self._metrics.account_command(command, "error", 0)
            raise
        self._metrics.account_command(command, outcome, amount)
        return result

    def _save(self, member: Member, row: PendingRow | None = None) -> None:
        # On a conflict (IntegrityError) nothing needs evicting: the repository hands out
        # deep copies of cached aggregates and fast-forwards the cached one on each get.
        # The fence: the markers as read by this command's load, just before it.
        # ``row``: the pending row recorded by this save (deleted in its transaction).
        self._accounts.save(
            member, fence=self._accounts.fence(), consumed=() if row is None else (row,)
        )

    def _with_pending(self, member: Member, ranks: RankLadder | None) -> PendingRow | None:
        """Record the member's pending earnings on ``member`` (before the command, in
        the command's save). Read after the member: a window committed in between only
        makes the save fail its revision check and the command retry."""
        row = self._accounts.pending_of(member.user_id)
        if row is None:
            return None
        ladder = ranks if ranks is not None else self._ranks()
        return row if self._accounts.fold(member, row, ladder) else None

    def _state_after(
        self, user_id: str, match: Callable[[Any], bool], *, with_rank_change: bool = False
    ) -> Member:
        """The member as it was right after the first event satisfying ``match`` (and
        the RankChanged event the same command recorded, if ``with_rank_change``)."""
        member: Any = None
        found = False
        stream: Iterable[Any] = self.app.events.get(Member.create_id(user_id))
        for domain_event in stream:
            if found:
                if with_rank_change and type(domain_event).__name__ == "RankChanged":
                    member = domain_event.mutate(member)
                break
            member = domain_event.mutate(member)
            found = match(domain_event)
        if member is None:  # the stream is gone: erased since the copy was loaded
            self._accounts.evict(user_id)
            raise MemberNotFound()
        if not found:  # the aggregate said it happened: the stream must show it
            raise LookupError("event not found in the member's stream")
        assert isinstance(member, Member)
        return member

    def spend(
        self, user_id: str, order_id: str, amount: int, source: str | None = None
    ) -> OrderResult:
        """Spend for ``source``'s ``order_id`` (order ids are scoped by source)."""

        def action() -> tuple[OrderResult, str, int]:
            member = self._accounts.get(user_id)
            key = member.order_key(order_id, source)
            replay = key in member.orders
            if replay:
                member.spend(order_id, amount, source)  # raises OrderConflict
                after = self._state_after(
                    user_id,
                    lambda e: _is(e, "Spent") and scoped_key(e.source, e.order_id) == key,
                )
                return OrderResult(order_id, amount, after.currency, True), REPLAYED, amount
            row = self._with_pending(member, None)  # pending currency is spendable
            member.spend(order_id, amount, source)  # raises InsufficientFunds
            self._save(member, row)
            return OrderResult(order_id, amount, member.currency), APPLIED, amount

        return self._observed(
            "spend", lambda: with_retry(self._locked(user_id, action), what="spend")
        )

    def refund(
        self, user_id: str, order_id: str, source: str | None = None, by: str | None = None
    ) -> OrderResult:
        """Refund ``source``'s ``order_id`` (another source's order is not found);
        ``by``: the operator refunding on the source's behalf, recorded on the event."""

        def action() -> tuple[OrderResult, str, int]:
            member = self._accounts.get(user_id)
            key = member.order_key(order_id, source)
            replay = key in member.refunded_orders
            if replay:
                amount = member.refund(order_id, source)
                after = self._state_after(
                    user_id,
                    lambda e: _is(e, "Refunded") and scoped_key(e.source, e.order_id) == key,
                )
                return OrderResult(order_id, amount, after.currency, True), REPLAYED, amount
            if key not in member.orders:
                member.refund(order_id, source)  # raises OrderNotFound
            row = self._with_pending(member, None)
            amount = member.refund(order_id, source, self._expiry(), self._clock(), by=by)
            self._save(member, row)
            return OrderResult(order_id, amount, member.currency), APPLIED, amount

        return self._observed(
            "refund", lambda: with_retry(self._locked(user_id, action), what="refund")
        )

    def compensate(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        source: str | None = None,
        fence: int | None = None,
    ) -> tuple[int, int, bool] | None:
        """An adjustment that never takes a balance below zero: a deduction larger than
        the balance (after the member's pending earnings are recorded in the same save)
        deducts what is there. Idempotent by ``source``'s ``adjustment_id``: a replay
        changes nothing and answers what was applied the first time. Returns (currency,
        rank points applied, replayed).

        ``fence``: the erasure generation the caller read before it weighed what it
        compensates; the save passes it to the event insert, which refuses a member being
        erased or erased since. Then nothing is saved (no account is created) and the
        answer is None."""

        def action() -> tuple[tuple[int, int, bool] | None, str, int]:
            try:
                member = self._accounts.get(user_id)
            except MemberNotFound:
                member = Member(user_id=user_id)
            except MemberBeingErased:
                if fence is None:
                    raise
                return None, "erased", 0
            done = member.adjustments.get(member.adjustment_key(adjustment_id, source))
            if done is not None:
                return (done.currency, done.rank_points, True), REPLAYED, done.currency
            ranks = self._ranks()
            row = self._with_pending(member, ranks)
            applied_currency = max(currency, -member.currency)
            applied_points = max(rank_points, -member.rank_points)
            member.adjust(adjustment_id, applied_currency, applied_points, reason, ranks, source)
            if fence is None:
                self._save(member, row)
            else:
                try:
                    self._accounts.save(member, fence=fence, consumed=() if row is None else (row,))
                except StreamErased as exc:
                    if exc.reason == "gone":  # a stale copy: read again
                        raise
                    with contextlib.suppress(MemberBeingErased):
                        self._accounts.refused(exc)  # evicts; raises while erasing
                    return None, "erased", 0
            return (applied_currency, applied_points, False), APPLIED, applied_currency

        return self._observed(
            "adjustment", lambda: with_retry(self._locked(user_id, action), what="adjustment")
        )

    def adjust(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        ranks: RankLadder,
        source: str | None = None,
    ) -> Member:
        """Apply an operator adjustment (ids scoped by ``source``); returns the member
        right after it. An unknown member gets an account (an operator may credit
        someone who has not earned yet); a rejected adjustment creates nothing."""

        def action() -> tuple[Member, str, int]:
            try:
                member = self._accounts.get(user_id)
            except MemberNotFound:
                member = Member(user_id=user_id)
            key = member.adjustment_key(adjustment_id, source)
            if key not in member.adjustments:
                row = self._with_pending(member, ranks)
                member.adjust(
                    adjustment_id,
                    currency,
                    rank_points,
                    reason,
                    ranks,
                    source,
                    month=month_of(now := self._clock()),
                    on=now.astimezone(UTC).date().isoformat(),
                )
                self._save(member, row)
                return member, APPLIED, currency
            member.adjust(adjustment_id, currency, rank_points, reason, ranks, source)
            after = self._state_after(
                user_id,
                lambda e: _is(e, "Adjusted") and scoped_key(e.source, e.adjustment_id) == key,
                with_rank_change=True,
            )
            return after, REPLAYED, currency

        return self._observed(
            "adjustment", lambda: with_retry(self._locked(user_id, action), what="adjustment")
        )
