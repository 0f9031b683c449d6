"""The operator's weighting rules: the current version, and a new one stored with the
moment it was written (later awards use it and record its version)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from loyalty.domain.rules import RuleSet


class RulesWriter(Protocol):
    """The stored rule versions (``adapters/rules_store.py``)."""

    def current(self) -> RuleSet: ...
    def put(
        self, wire: dict[str, object], now: datetime | None = None, *, author: str | None = None
    ) -> RuleSet: ...


class RuleBook:
    def __init__(self, store: RulesWriter, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    def current(self) -> RuleSet:
        return self._store.current()

    def replace(self, wire: dict[str, object], author: str | None = None) -> RuleSet:
        """Validate and store ``wire`` as the next version (raises ``InvalidRules``),
        with ``author`` (the name of the key that stores it)."""
        return self._store.put(wire, self._clock(), author=author)
