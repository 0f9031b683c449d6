"""Growing pauses for the background loops (pipeline, projection) after a retryable error."""

from __future__ import annotations

import logging
import threading


class Backoff:
    """Wait after a retryable error: 0.5 s, doubling up to 10 s, until a success."""

    def __init__(self, stop: threading.Event, log: logging.Logger, what: str) -> None:
        self._stop = stop
        self._log = log
        self._what = what
        self.delay = 0.5

    def reset(self) -> None:
        self.delay = 0.5

    def pause(self, exc: BaseException) -> None:
        self._log.warning(
            "%s paused (%s: %s); retrying in %.1fs",
            self._what,
            type(exc).__name__,
            (str(exc).splitlines() or [""])[0],
            self.delay,
        )
        self._stop.wait(self.delay)
        self.delay = min(self.delay * 2, 10.0)
