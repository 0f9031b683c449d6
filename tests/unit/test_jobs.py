"""The one periodic job runner, against real time (intervals of tens of milliseconds)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from loyalty.application.backoff import Backoff
from loyalty.application.jobs import JobRunner
from loyalty.observability import Metrics


class Surprise(Exception):
    """A kind nobody listed (a NUL in a URL, a KeyError in a sender)."""


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def wait_until(check: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)
    assert check(), "timed out"  # type: ignore[operator]


def test_a_job_that_raises_an_unlisted_kind_is_run_again_backs_off_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="loyalty")
    metrics = Metrics(process=False)
    calls: list[float] = []
    failing_seen: list[float] = []

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) == 4:  # after three failures: the gauge says failing
            failing_seen.append(sample(metrics.registry, "loyalty_job_failing", job="flaky"))
        if len(calls) <= 4:
            raise Surprise(f"bad input number {len(calls)}\nsecond line")

    runner = JobRunner(
        "flaky",
        step,
        interval=0.01,
        backoff=Backoff(0.02, 1.0),
        metrics=metrics,
        retry_errors=(ConnectionError,),
    )
    thread = runner.start()
    wait_until(lambda: runner.runs >= 3)
    assert thread.is_alive()  # the loop did not die of the exception

    # counted: four failures of one kind, then successful runs
    assert runner.failures == 4 and runner.failures_by_kind == {"Surprise": 4}
    reg = metrics.registry
    assert sample(reg, "loyalty_job_failures_total", job="flaky", kind="Surprise") == 4
    assert sample(reg, "loyalty_job_runs_total", job="flaky") >= 3
    assert sample(reg, "loyalty_job_last_success_timestamp_seconds", job="flaky") > time.time() - 60
    assert failing_seen == [1.0]
    assert sample(reg, "loyalty_job_failing", job="flaky") == 0.0
    assert not runner.failing and runner.last_error == "Surprise: bad input number 4"

    # backed off: each pause after a failure at least half the doubling delay
    gaps = [b - a for a, b in zip(calls[:4], calls[1:5], strict=True)]
    for n, gap in enumerate(gaps):
        assert gap >= 0.02 * 2**n / 2, gaps

    # logged once for the kind (with its traceback: nobody listed it), then recovered
    failed = [r for r in caplog.records if "flaky failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert failed[0].levelno == logging.ERROR and failed[0].exc_info is not None
    assert "flaky failed (Surprise: bad input number 1)" in failed[0].getMessage()
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1 and "after 4 failure(s)" in recovered[0]

    started = time.monotonic()
    runner.stop()
    assert runner.join(timeout=5) and time.monotonic() - started < 0.5


def test_a_listed_kind_is_logged_without_traceback_and_again_after_a_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="loyalty")
    plan = ["fail", "fail", "ok", "fail", "ok"]
    done = threading.Event()

    def step() -> None:
        outcome = plan.pop(0) if plan else "ok"
        if not plan:
            done.set()
        if outcome == "fail":
            raise ConnectionError("database went away")

    runner = JobRunner(
        "listed", step, interval=0.01, backoff=Backoff(0.01, 0.02), retry_errors=(ConnectionError,)
    )
    runner.start()
    assert done.wait(10)
    runner.stop()
    assert runner.join(5)
    failed = [r for r in caplog.records if "listed failed" in r.getMessage()]
    assert len(failed) == 2  # once per failing spell, not per retry
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in failed)
    assert runner.failures == 3


def test_stop_is_prompt_in_a_long_interval_and_in_a_long_backoff() -> None:
    idle = JobRunner("idle", lambda: None, interval=60.0)
    failing = JobRunner("failing", lambda: 1 / 0, interval=60.0, backoff=Backoff(60.0, 60.0))
    for runner in (idle, failing):
        runner.start()
    wait_until(lambda: idle.runs == 1 and failing.failures == 1)
    started = time.monotonic()
    idle.stop()
    failing.stop()
    assert idle.join(5) and failing.join(5)
    assert time.monotonic() - started < 0.5
    assert failing.failures == 1 and failing.failures_by_kind == {"ZeroDivisionError": 1}


def test_the_job_runs_only_while_its_lease_is_held(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loyalty")
    answers = [False, False, True]  # then True until `lose` is set
    lose = threading.Event()
    events: list[str] = []

    def try_lease() -> bool:
        if lose.is_set():
            return False
        return answers.pop(0) if answers else True

    runner = JobRunner(
        "leased",
        lambda: events.append("run") and None,
        interval=0.01,
        try_lease=try_lease,
        lease_retry=0.02,
        on_lease_lost=lambda: events.append("lost"),
        release_lease=lambda: events.append("released"),
    )
    runner.start()
    wait_until(lambda: runner.runs >= 2)
    assert not answers  # asked twice in vain before the first run
    lose.set()
    wait_until(lambda: "lost" in events)
    runs = runner.runs
    time.sleep(0.1)
    assert runner.runs == runs and not runner.leased  # no run without the lease
    runner.stop()
    assert runner.join(5)
    assert events[-1] == "released"
    text = caplog.text
    assert "leased runs in this process" in text and "leased lost its lease" in text
