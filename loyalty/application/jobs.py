"""The one periodic job runner: every background loop of the project runs on it.

A job is a step (a callable) the runner calls again and again until its stop event is
set: the pipeline's award window, the read models' catch-up, forget-me, retention,
currency expiry, the webhook dispatcher and each delivery loop, the relay.

- **Interval.** After a run the runner waits what the step returned (seconds; ``0`` to
  run again at once) or, when it returned None, the job's ``interval``. The first run
  comes ``first_delay`` seconds after the start.
- **Lease.** With ``try_lease`` the job runs only while this process holds its lease
  (the lease adapters: ``ShardLeases`` keys of ``loyalty.adapters.lease_keys``). It is
  asked before the first run and then again at most every ``lease_retry`` seconds (a
  lease dies with its database session); without it the runner waits ``lease_retry``
  and asks again. Gaining it is logged, so is losing it (``on_lease_lost`` then stops
  what the lease guarded); ``release_lease`` gives it back when the runner ends.
- **Failure.** Any exception of a step (or of the lease question) is a failed run: the
  loop never dies of one, whatever its type. It is counted (``failures``, by kind, and
  ``JobMetrics.job_failed``), logged once per kind until the job recovers (a listed
  ``retry_errors`` kind as a warning without traceback, any other as an error with
  it), and the next run waits a growing, jittered pause (``Backoff``). The job is
  *failing* from its first failure to its next success, which is logged once and
  counted; ``mark_failing`` records that state where operators see it (a delivery
  loop's ``delivery_cursors.failing_since``/``last_error``).
- **Stop.** Only the stop event ends the loop; every wait is on it, so :meth:`stop`
  takes effect at once (a step in progress finishes first). A step whose wait the stop
  cut short raises ``InterruptedError``: that is not a failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from loyalty.application.backoff import Backoff

log = logging.getLogger(__name__)

Step = Callable[[], float | None]
"""One run of a job; returns the pause before the next (None: the job's interval)."""


@runtime_checkable
class JobMetrics(Protocol):
    """Implemented by ``loyalty.observability.Metrics`` (families ``loyalty_job_*``)."""

    def job_succeeded(self, job: str) -> None: ...
    def job_failed(self, job: str, kind: str) -> None: ...
    def job_failing(self, job: str, failing: bool) -> None: ...


def job_metrics(*candidates: object) -> JobMetrics | None:
    """The first of ``candidates`` that records job metrics (a use case's metrics are
    the process's ``Metrics``, which does)."""
    for candidate in candidates:
        if isinstance(candidate, JobMetrics):
            return candidate
    return None


def first_run_delay(interval: float, first: float | None = None) -> float:
    """A periodic job's first run: ``first``, or soon after start (at most 30 s)."""
    return min(interval, 30.0) if first is None else first


def periodic_backoff(interval: float) -> Backoff:
    """For a job that runs every ``interval`` seconds (retention, expiry): a failed run
    is retried sooner than the next planned one, but never more often than that."""
    return Backoff(min(interval, 1.0), min(interval, 60.0))


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


class JobRunner:
    """Runs ``step`` periodically until stopped (see the module's docstring)."""

    def __init__(
        self,
        name: str,
        step: Step,
        *,
        interval: float,
        first_delay: float = 0.0,
        try_lease: Callable[[], bool] | None = None,
        release_lease: Callable[[], None] | None = None,
        lease_retry: float = 2.0,
        on_lease_lost: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
        retry_errors: tuple[type[BaseException], ...] = (),
        on_failure: Callable[[BaseException], None] | None = None,
        backoff: Backoff | None = None,
        metrics: JobMetrics | None = None,
        mark_failing: Callable[[str | None], bool] | None = None,
        stop_event: threading.Event | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self._step = step
        self._interval = interval
        self._first = first_delay
        self._try_lease = try_lease
        self._release_lease = release_lease
        self._lease_retry = lease_retry
        self._on_lease_lost = on_lease_lost
        self._on_end = on_end
        self.retry_errors = retry_errors
        self._on_failure = on_failure
        self._backoff = backoff or Backoff()
        self.metrics = metrics
        self._mark_failing = mark_failing
        self._log = logger or log
        self.stop_event = stop_event or threading.Event()
        self.leased = False
        self._lease_asked = 0.0
        self._logged: set[str] = set()
        self._marked = False
        self._streak = 0
        self.runs = 0
        """Successful runs."""
        self.failures = 0
        self.failures_by_kind: Counter[str] = Counter()
        self.last_success: float | None = None
        """Wall-clock time (epoch seconds) of the last successful run."""
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None

    # -- running ----------------------------------------------------------------------

    def run(self) -> None:
        """Run until the stop event is set (in the calling thread)."""
        wait = self._first
        try:
            while not self.stop_event.wait(wait):
                wait = self._round()
        finally:
            self._finish()

    def start(self, thread_name: str | None = None) -> threading.Thread:
        """Run in a daemon thread of its own."""
        self._thread = threading.Thread(target=self.run, name=thread_name or self.name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread :meth:`start` started; True when it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def _round(self) -> float:
        try:
            if not self._hold_lease():
                return self._lease_retry
            delay = self._step()
        except Exception as exc:  # noqa: BLE001  (counted, logged, backed off: see _failed)
            if isinstance(exc, InterruptedError) and self.stop_event.is_set():
                return 0.0  # a wait inside the step cut short by the stop: the loop ends
            return self._failed(exc)
        self._succeeded()
        return self._interval if delay is None else max(0.0, delay)

    def _hold_lease(self) -> bool:
        if self._try_lease is None:
            return True
        now = time.monotonic()
        if self.leased and now - self._lease_asked < self._lease_retry:
            return True
        self._lease_asked = now
        held = self._try_lease()
        if held and not self.leased:
            self._log.info("%s runs in this process", self.name)
        elif self.leased and not held:
            self._log.warning("%s lost its lease", self.name)
            if self._on_lease_lost is not None:
                self._on_lease_lost()
        self.leased = held
        return held

    def _finish(self) -> None:
        try:
            if self._on_end is not None:
                self._on_end()
        finally:
            if self._release_lease is not None:
                self._release_lease()
            self.leased = False

    # -- outcomes ---------------------------------------------------------------------

    def _failed(self, exc: Exception) -> float:
        kind = type(exc).__name__
        self.failures += 1
        self.failures_by_kind[kind] += 1
        self._streak += 1
        self.last_error = f"{kind}: {first_line(exc)}"
        self._lease_asked = 0.0  # the lease may have gone with the error: ask again
        delay = self._backoff.next()
        if kind not in self._logged:
            self._logged.add(kind)
            expected = isinstance(exc, self.retry_errors)
            self._log.log(
                logging.WARNING if expected else logging.ERROR,
                "%s failed (%s: %s); retrying with backoff (next in %.2fs; this kind is "
                "logged once until the job recovers)",
                self.name,
                kind,
                first_line(exc),
                delay,
                exc_info=None if expected else exc,
            )
        if self.failing_since is None:
            self.failing_since = time.time()
            if self.metrics is not None:
                self.metrics.job_failing(self.name, True)
        if self.metrics is not None:
            self.metrics.job_failed(self.name, kind)
        if self._on_failure is not None:
            self._hook(self._on_failure, exc)
        if self._mark_failing is not None:
            self._marked = bool(self._hook(self._mark_failing, kind)) or self._marked
        return delay

    def _succeeded(self) -> None:
        self.runs += 1
        self.last_success = time.time()
        self._backoff.reset()
        if self.metrics is not None:
            self.metrics.job_succeeded(self.name)
        if self.failing_since is not None:
            self._log.info(
                "%s recovered after %d failure(s) in %.1fs",
                self.name,
                self._streak,
                time.time() - self.failing_since,
            )
            self.failing_since = None
            self._streak = 0
            self._logged.clear()
            if self.metrics is not None:
                self.metrics.job_failing(self.name, False)
        if self._marked and self._mark_failing is not None:
            self._marked = not self._hook(self._mark_failing, None)

    def _hook(self, hook: Callable[..., object], *args: object) -> object:
        """Call a failure hook; its own failure (the database is down too) is logged
        and the next run tries again: it must not end the loop either."""
        try:
            return hook(*args)
        except Exception as exc:  # noqa: BLE001  (logged; the next run calls it again)
            self._log.warning(
                "%s: %s (%s: %s)", self.name, hook, type(exc).__name__, first_line(exc)
            )
            return None


class PeriodicJob(JobRunner):
    """A job that runs ``_once`` every ``interval_seconds`` (expiry, retention): its first
    run soon after start (``first_run_delay``), a failed run retried with
    ``periodic_backoff``."""

    def __init__(
        self,
        name: str,
        *,
        interval_seconds: float,
        first_delay_seconds: float | None = None,
        metrics: JobMetrics | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(
            name,
            self._once,
            interval=interval_seconds,
            first_delay=first_run_delay(interval_seconds, first_delay_seconds),
            backoff=periodic_backoff(interval_seconds),
            metrics=metrics,
            logger=logger,
        )

    def _once(self) -> None:
        raise NotImplementedError
