"""The one backoff of the project: exponential, capped, with jitter.

Used by the periodic job runner (``loyalty.application.jobs``) after a failed run and by
the webhook sink between attempts at one event (``RetryPolicy``)."""

from __future__ import annotations

import random

FIRST_DELAY = 0.25
# Short enough that a loop resumes within ~2 s of the database being back after any
# outage (the error is one cheap failed connect: a longer pause saves nothing).
MAX_DELAY = 2.0


def backoff_delay(attempt: int, first: float, maximum: float, *, full_jitter: bool) -> float:
    """The pause before retry number ``attempt`` (1, 2, ...): ``first`` doubling up to
    ``maximum``, jittered. Full jitter draws from [0, d] (many senders spreading their
    retries); otherwise from [d/2, d] (one loop: never much sooner than planned)."""
    ceiling = min(maximum, first * 2 ** min(max(attempt - 1, 0), 62))
    return random.uniform(0.0 if full_jitter else ceiling / 2, ceiling)


class Backoff:
    """Growing pauses after consecutive failures, until :meth:`reset` (a success)."""

    def __init__(self, first: float = FIRST_DELAY, maximum: float = MAX_DELAY) -> None:
        self.first = first
        self.maximum = max(first, maximum)
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        """The pause after one more failure."""
        self.attempt += 1
        return backoff_delay(self.attempt, self.first, self.maximum, full_jitter=False)
