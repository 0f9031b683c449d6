"""The weighting pipeline: ingress log -> rules -> pending earnings -> recorded awards.

Per shard: read the rows past the checkpoint (at most ``chunk``), durably note the end
of that window together with the rules version it is weighed under (the newest, read in
the noting transaction: see ``PipelineStore.set_pending``), weigh and aggregate them,
then advance the checkpoint together with the cap counters and each member's exact
contribution to its pending earnings (``loyalty.application.pending``) in one
transaction. A crash anywhere re-reads exactly the same window (under the version noted
with it); its contributions are added only by the commit that advances the checkpoint,
so each event is counted exactly once.

Pending earnings become account events (one ``Awarded`` per member) when the member's
pending row is older than the award interval (:meth:`Pipeline.record_due`, after each
drain), at once when they would lift the member's rank or the member has no account yet
(right after the commit), and with any command on the member (``Spending``).

Both checkpoint writes are compare-and-sets on the position the window was read after
(noting the end: only if no window is noted; committing: only if this window is), so
correctness never rests on the shard lease: two workers on one shard (a lease lost with
its database session) can only note the same end for a window, award it under the same
award id, and one of them commits it; the other gets :class:`LeaseLost`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from loyalty.application.accounts import Accounts, StreamErased
from loyalty.application.collector import cyclic_gc_paused
from loyalty.application.jobs import JobRunner, job_metrics
from loyalty.application.pending import Contribution, PendingRow, PendingStore
from loyalty.application.read_ahead import ReadAhead
from loyalty.application.reporting import ActivityFacts
from loyalty.domain.errors import MemberBeingErased
from loyalty.domain.explain import summarize
from loyalty.domain.rules import (
    ActivityLike,
    CapCounter,
    CapKey,
    RuleSet,
    aggregate,
    utc_date,
)

log = logging.getLogger(__name__)

Position = tuple[int, int]


def shard_ranges(shards: list[int]) -> str:
    """``0-3, 7, 9-10`` for [0, 1, 2, 3, 7, 9, 10] (in any order)."""
    runs: list[list[int]] = []
    for shard in sorted(shards):
        if runs and runs[-1][1] == shard - 1:
            runs[-1][1] = shard
        else:
            runs.append([shard, shard])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class LeaseLost(Exception):
    """A checkpoint write found the shard's checkpoint moved: another worker has taken
    the shard over. Nothing was written; drop the window and re-take the leases."""


class IngressRow(ActivityLike, Protocol):
    """An activity as the pipeline reads it: with its position in the ingress log."""

    @property
    def position(self) -> Position: ...


class IngressReader(Protocol):
    def read_after(
        self, shard: int, after: Position, limit: int, upto: Position | None = None
    ) -> Sequence[IngressRow]: ...


class CheckpointLike(Protocol):
    @property
    def position(self) -> Position: ...
    @property
    def pending(self) -> Position | None: ...
    @property
    def pending_version(self) -> int | None: ...


class PipelineState(Protocol):
    def load(self, shard: int) -> CheckpointLike: ...
    def set_pending(self, shard: int, start: Position, end: Position) -> int:
        """Note the window's end; returns the rules version it is weighed under (read
        in the same transaction)."""
        ...

    def commit(
        self,
        shard: int,
        start: Position,
        end: Position,
        cap_changes: Mapping[CapKey, int],
        *,
        processed: int,
        awards: int,
        contributions: Sequence[Contribution] = (),
        fence: int | None = None,
        facts: ActivityFacts | None = None,
    ) -> Sequence[PendingRow]: ...
    def load_caps(self, keys: Iterable[CapKey]) -> dict[CapKey, int]: ...
    def pending_rows(self) -> PendingStore: ...


class RulesSource(Protocol):
    def current(self) -> RuleSet: ...


class VersionedRules(RulesSource, Protocol):
    def at(self, version: int) -> RuleSet:
        """A stored version (they never change)."""
        ...


class PipelineMetrics(Protocol):
    """Where pipeline throughput and lag are recorded (``loyalty.observability``)."""

    def window_processed(self, *, events: int, awards: int, seconds: float) -> None: ...
    def pipeline_lag(self, *, pending: int, oldest_age_s: float | None) -> None: ...


LagProbe = Callable[[], tuple[int, float | None]]
"""Returns (events pending, age in seconds of the oldest pending event or None)."""


class Pipeline:
    def __init__(
        self,
        reader: IngressReader,
        state: PipelineState,
        rules: VersionedRules,
        accounts: Accounts,
        *,
        chunk: int,
        crash_hook: Callable[[str], None] | None = None,
        metrics: PipelineMetrics | None = None,
        forgotten_at: Callable[[str], datetime | None] | None = None,
        forgotten_any: Callable[[], bool] | None = None,
        interval_seconds: float = 3600.0,
        record_group: int = 2000,
        rollups: bool = True,
    ) -> None:
        self._reader = reader
        self._rollups = rollups  # off only to measure what the rollups cost
        self.interval_seconds = interval_seconds
        self._record_group = record_group
        self._forgotten_any = forgotten_any
        self.metrics = metrics
        self._state = state
        self._rules = rules
        self._accounts = accounts
        if accounts.pending is None:  # the pipeline owns the pending rows it records
            accounts.pending = state.pending_rows()
        self.chunk = chunk
        # Tests inject crashes between steps; production leaves this None.
        self._crash_hook = crash_hook or (lambda _step: None)
        self._forgotten_at = forgotten_at
        self._ahead: ReadAhead[IngressRow] = ReadAhead(
            lambda shard, after: self._reader.read_after(shard, after, self.chunk)
        )

    def _any_forgotten(self) -> bool:
        if self._forgotten_at is None:
            return False
        return self._forgotten_any() if self._forgotten_any is not None else True

    def _was_forgotten(self, row: IngressRow) -> bool:
        assert self._forgotten_at is not None
        forgotten = self._forgotten_at(row.user_id)
        return forgotten is not None and row.occurred_at <= forgotten

    def process_shard(self, shard: int, then: int | None = None) -> int:
        """Award one window of ``shard``; returns how many ingress events it covered.

        ``then`` names the shard the caller processes next if this window is not full:
        its first window is read while this one is weighed and awarded."""
        with cyclic_gc_paused():
            try:
                return self._process_window(shard, then)
            except LeaseLost:
                self._ahead.discard()
                raise

    def _read_next(self, shard: int, end: Position, full: bool, then: int | None) -> None:
        if full:  # the caller comes back to this shard
            self._ahead.start(shard, end)
            return
        if then is None:
            return
        checkpoint = self._state.load(then)
        if checkpoint.pending is None:
            self._ahead.start(then, checkpoint.position)

    def _process_window(self, shard: int, then: int | None) -> int:
        started = time.monotonic()
        checkpoint = self._state.load(shard)
        if checkpoint.pending is not None:  # a window was started and not finished
            self._ahead.discard()
            end = checkpoint.pending
            version: int | None = checkpoint.pending_version
            rows = self._reader.read_after(shard, checkpoint.position, 10**9, upto=end)
        else:
            found = self._ahead.take(shard, checkpoint.position)
            rows = (
                found
                if found is not None
                else self._reader.read_after(shard, checkpoint.position, self.chunk)
            )
            if not rows:
                self._read_next(shard, checkpoint.position, False, then)
                return 0
            end = rows[-1].position
            self._crash_hook("window_read")
            version = self._state.set_pending(shard, checkpoint.position, end)
            self._read_next(shard, end, len(rows) >= self.chunk, then)
        self._crash_hook("window_noted")
        # the version noted with the window (never a cached "current": see set_pending);
        # none only for a window noted before versions were noted with windows
        rule_set = self._rules.current() if version is None else self._rules.at(version)
        window_size = len(rows)
        if self._any_forgotten():  # events of forgotten members that slipped in
            rows = [r for r in rows if not self._was_forgotten(r)]
        # the erasure generation the window's events were filtered at (read after the
        # filter, which refreshes the markers): its commit refuses contributions of
        # members erased since (see ``pending_store.merge``)
        fence = self._accounts.fence()
        capped_types = {t for t, rule in rule_set.rules.items() if rule.daily_cap is not None}
        capped_keys = {
            (r.user_id, r.event_type, utc_date(r)) for r in rows if r.event_type in capped_types
        }
        caps = CapCounter(self._state.load_caps(capped_keys))
        facts = ActivityFacts() if self._rollups else None  # the day x source x type rollup
        result = aggregate(rows, rule_set, caps, facts, explain=True)
        # members who earned nothing in the window (capped or unknown events only) add
        # their counts to the explanation of a pending row that exists
        contributions = [
            Contribution(
                d.user_id,
                d.exact_currency,
                d.exact_rank_points,
                d.event_count,
                rule_set.version,
                summarize(d, rule_set),
                d.exact_currency_months,
            )
            for d in result.drafts.values()
            if d.exact_currency or d.exact_rank_points or d.capped or d.ignored
        ]
        earning = sum(1 for c in contributions if c.currency or c.rank_points)
        self._crash_hook("awarded")
        try:
            settle = self._state.commit(
                shard,
                checkpoint.position,
                end,
                caps.changes(),
                processed=window_size,
                awards=earning,
                contributions=contributions,
                fence=fence,
                facts=facts,
            )
        except StreamErased as exc:  # nothing written: the window is read again
            self._accounts.refused(exc)  # raises MemberBeingErased while erasing
            raise MemberBeingErased() from exc
        caps.mark_saved()
        self._crash_hook("committed")
        # new accounts and rank changes are recorded at once (a crash here leaves them
        # pending: the next window of the member, or the interval, records them)
        recorded = self._accounts.settle_pending(settle, rule_set.ranks)
        if self.metrics is not None:
            self.metrics.window_processed(
                events=window_size, awards=recorded, seconds=time.monotonic() - started
            )
        return window_size

    def settle_left(self, shards: Collection[int]) -> int:
        """Settle what a worker killed between a window's commit and its settling left
        unsettled in ``shards`` (called when a worker takes their leases): a new
        member's row would otherwise wait for the award interval, the member without an
        account (not found) until then. Returns how many awards were recorded."""
        pending = self._accounts.pending
        if pending is None or not shards:
            return 0
        ranks = self._rules.current().ranks
        total = 0
        seen: set[tuple[str, Position]] = set()
        while True:
            rows = [
                r
                for r in pending.unsettled(shards, self._record_group)
                if (r.user_id, r.upto) not in seen  # a row settled meanwhile: done
            ]
            if not rows:
                return total
            seen.update((r.user_id, r.upto) for r in rows)
            total += self._accounts.settle_pending(rows, ranks)

    def record_all(self, shards: Collection[int]) -> int:
        """Record every pending row of ``shards`` now, whatever its age (tests, tools)."""
        return self.record_due(shards, now=datetime.max.replace(tzinfo=UTC))

    def record_due(
        self,
        shards: Collection[int],
        stop: threading.Event | None = None,
        now: datetime | None = None,
    ) -> int:
        """Record the pending earnings of the members of ``shards`` whose oldest pending
        contribution is older than the award interval; returns how many were recorded."""
        pending = self._accounts.pending
        if pending is None or not shards:
            return 0
        before = (now or datetime.now(UTC)) - timedelta(seconds=self.interval_seconds)
        total = 0
        ranks = self._rules.current().ranks
        while stop is None or not stop.is_set():
            due = pending.due(shards, before, self._record_group)
            if not due:
                break
            total += self._accounts.record_pending(due, ranks)
            if len(due) < self._record_group:
                break
        return total

    def drain(self, shards: Iterable[int], stop: threading.Event | None = None) -> int:
        """Process every shard until nothing is pending; returns events processed."""
        total = 0
        order = list(shards)
        for i, shard in enumerate(order):
            then = order[i + 1] if i + 1 < len(order) else None
            while stop is None or not stop.is_set():
                done = self.process_shard(shard, then)
                total += done
                if done < self.chunk:
                    break
        return total


class Worker(JobRunner):
    """Runs the pipeline over the shards this process leases, once per award window, on
    the job runner (leases per shard are its own: :meth:`_lease_missing`)."""

    def __init__(
        self,
        pipeline: Pipeline,
        shards: Sequence[int],
        *,
        window_seconds: float,
        try_lease: Callable[[int], bool],
        retry_errors: tuple[type[BaseException], ...],
        held_leases: Callable[[], Collection[int]] | None = None,
        on_error: Callable[[], None] | None = None,
        lag_probe: LagProbe | None = None,
        lag_every_seconds: float = 5.0,
    ) -> None:
        super().__init__(
            "pipeline",
            self._process,
            interval=window_seconds,
            retry_errors=retry_errors,
            on_failure=self._after_failure,
            metrics=job_metrics(pipeline.metrics),
            logger=log,
        )
        self._pipeline = pipeline
        self._lag_probe = lag_probe
        self._lag_every = lag_every_seconds
        self._lag_due = 0.0
        self._wanted = list(shards)
        self._owned: list[int] = []
        self._window_seconds = window_seconds
        self._try_shard = try_lease
        self._held_leases = held_leases
        # After a database error: drop the pooled connections that died with it (a
        # restart ends them all; found one by one, each costs the pool a back-off).
        self._on_error = on_error or (lambda: None)

    def _lease_missing(self) -> None:
        if self._held_leases is not None:  # asks the database: a lease dies with its session
            held = self._held_leases()
            lost = [s for s in self._owned if s not in held]
            if lost:
                log.warning("worker lost the lease of shards %s", lost)
                self._owned = [s for s in self._owned if s in held]
        gained = []
        for shard in self._wanted:
            if shard not in self._owned and self._try_shard(shard):
                self._owned.append(shard)
                gained.append(shard)
        if gained:  # one line however many (at start: every shard of the spec)
            log.info("worker owns shards %s", shard_ranges(gained))
            # what a worker killed before settling its last windows left (a retry error
            # drops the leases from _owned: this runs again when they are re-taken)
            settled = self._pipeline.settle_left(gained)
            if settled:
                log.info(
                    "settled %d awards left unsettled in shards %s", settled, shard_ranges(gained)
                )

    def _process(self) -> float:
        """One round: take missing leases, process due windows; returns the pause until
        the next round (a window after this one's start)."""
        started = time.monotonic()
        try:
            self._lease_missing()
            self._pipeline.drain(sorted(self._owned), self.stop_event)
            self._pipeline.record_due(self._owned, self.stop_event)
        except LeaseLost as exc:
            # Another worker committed or noted a window of one of our shards: our
            # lease of it is gone. Nothing of the window was written; ask again.
            log.warning("pipeline: %s; taking the leases again", exc)
            self._owned.clear()
            return 0.05
        self._sample_lag()
        return max(0.0, self._window_seconds - (time.monotonic() - started))

    def _after_failure(self, _exc: BaseException) -> None:
        # Leases live in a database session: take them again (a no-op for those still
        # held), so that a lease lost with the session is never assumed.
        self._owned.clear()
        self._on_error()

    def _sample_lag(self) -> None:
        """Report the pipeline's lag, at most every ``lag_every_seconds``."""
        metrics = self._pipeline.metrics
        if metrics is None or self._lag_probe is None or time.monotonic() < self._lag_due:
            return
        self._lag_due = time.monotonic() + self._lag_every
        pending, oldest_age = self._lag_probe()
        metrics.pipeline_lag(pending=pending, oldest_age_s=oldest_age)
