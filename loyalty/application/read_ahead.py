"""One read of the ingress log in flight while the pipeline weighs the previous window.

The read's time in PostgreSQL (a third of a window) then overlaps the Python work of
weighing and awarding. A read started for ``(shard, after)`` is only used for a window
that starts at exactly that checkpoint; anything else discards it. Using an early read
is safe: it holds rows below the transaction horizon of its moment, a prefix of what a
later read would return, so it is a complete window that ends a little earlier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Position = tuple[int, int]
Row = TypeVar("Row")


class ReadAhead(Generic[Row]):
    def __init__(self, read: Callable[[int, Position], Sequence[Row]]) -> None:
        self._read = read
        self._key: tuple[int, Position] | None = None
        self._future: Future[Sequence[Row]] | None = None

    def start(self, shard: int, after: Position) -> None:
        """Begin reading ``shard``'s window after ``after`` in a thread of its own."""
        self.discard()
        future: Future[Sequence[Row]] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._read(shard, after))
            except BaseException as exc:  # handed to take(), which raises it in the caller
                future.set_exception(exc)

        self._key, self._future = (shard, after), future
        threading.Thread(target=run, name="pipeline-read-ahead", daemon=True).start()

    def take(self, shard: int, after: Position) -> Sequence[Row] | None:
        """The rows read for exactly ``(shard, after)`` (waiting for them), else None."""
        key, future = self._key, self._future
        self._key = self._future = None
        if future is None or key != (shard, after):
            return None
        return future.result()

    def discard(self) -> None:
        """Forget the read in flight (its thread finishes on its own)."""
        if self._future is not None:
            self._future.cancel()
        self._key = self._future = None
