"""Growing pauses for the background loops (pipeline, projection) after a retryable error."""

from __future__ import annotations

import logging
import threading

FIRST_DELAY = 0.25
# Short enough that a loop resumes within ~2 s of the database being back after any
# outage (the error is one cheap failed connect: a longer pause saves nothing).
MAX_DELAY = 2.0


class Backoff:
    """Wait after a retryable error: 0.25 s, doubling up to 2 s, until a success."""

    def __init__(self, stop: threading.Event, log: logging.Logger, what: str) -> None:
        self._stop = stop
        self._log = log
        self._what = what
        self.delay = FIRST_DELAY

    def reset(self) -> None:
        self.delay = FIRST_DELAY

    def pause(self, exc: BaseException) -> None:
        self._log.warning(
            "%s paused (%s: %s); retrying in %.1fs",
            self._what,
            type(exc).__name__,
            (str(exc).splitlines() or [""])[0],
            self.delay,
        )
        self._stop.wait(self.delay)
        self.delay = min(self.delay * 2, MAX_DELAY)
