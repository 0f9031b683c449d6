"""Reviewing rule changes (issue 33, item 4): the stored versions with who stored them
and when, and what changed from one version (or a candidate) to the next, field by
field, for the console (before a save, and in the history) and ``loyalty rules
history``.

A change is named by a path into the rules document in which rules are keyed by their
event type and ranks by their name (``rules[played_game].currency``,
``ranks[gold].min_rank_points``), so a reordered list is no change and an edited rule is
one line per edited field, not a removed and an added rule."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loyalty.application.commands.rules import rule_set_to_wire
from loyalty.domain.rules import RuleSet

OPTIONAL_PARTS: tuple[str, ...] = ("currency_expiry", "rank_qualification")
"""The parts of a rules document that may be absent (unset: ``null``)."""
KEYED_LISTS: dict[str, str] = {"rules": "event_type", "ranks": "name"}
"""The lists of a rules document whose items are named by a field."""
UNKNOWN_AUTHOR = "unknown"
"""Shown for a version stored without an author (version 1, the built-in default, and
versions stored before the author was kept)."""


def full_wire(rules: RuleSet | Mapping[str, Any]) -> dict[str, Any]:
    """The rules document (of a rule set, or a stored document) with every part, an
    unset optional one as ``null`` (what ``loyalty rules show`` prints: it loads back as
    it is)."""
    wire = dict(rules) if isinstance(rules, Mapping) else rule_set_to_wire(rules)
    for part in OPTIONAL_PARTS:
        wire.setdefault(part, None)
    return wire


@dataclass(frozen=True, slots=True)
class RuleChange:
    """One field of the rules document that differs; ``kind`` ``added`` (``before`` is
    None), ``removed`` (``after`` is None) or ``changed`` (either may be null: a cap
    set to none)."""

    path: str
    before: Any
    after: Any
    kind: str = "changed"

    def describe(self) -> str:
        """One line: ``rules[logged_on].currency: 1 -> 3``."""
        if self.kind == "added":
            return f"{self.path}: added {shown(self.after)}"
        if self.kind == "removed":
            return f"{self.path}: removed (was {shown(self.before)})"
        return f"{self.path}: {shown(self.before)} -> {shown(self.after)}"

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "before": self.before, "after": self.after}


def shown(value: Any) -> str:
    """A value as compact JSON (``null`` for unset)."""
    return json.dumps(value, separators=(", ", ": "), sort_keys=True)


def _keyed(items: list[Any], key: str) -> dict[str, Any] | None:
    """A list of objects by their ``key`` field, or None when it is not such a list."""
    if not all(isinstance(i, Mapping) and isinstance(i.get(key), str) for i in items):
        return None
    out = {i[key]: i for i in items}
    return out if len(out) == len(items) else None


_ABSENT: Any = object()


def _walk(path: str, before: Any, after: Any, field: str | None, out: list[RuleChange]) -> None:
    if before == after:
        return
    if before is _ABSENT or after is _ABSENT:
        kind = "added" if before is _ABSENT else "removed"
        out.append(RuleChange(path, _value(before), _value(after), kind))
        return
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        for name in [*before, *(k for k in after if k not in before)]:
            _walk(
                f"{path}.{name}" if path else name,
                _part(path, name, before),
                _part(path, name, after),
                name,
                out,
            )
        return
    key = KEYED_LISTS.get(field or "")
    if key is not None and isinstance(before, list) and isinstance(after, list):
        old, new = _keyed(before, key), _keyed(after, key)
        if old is not None and new is not None:
            for name in [*old, *(k for k in new if k not in old)]:
                _walk(f"{path}[{name}]", old.get(name, _ABSENT), new.get(name, _ABSENT), None, out)
            if old.keys() == new.keys() and list(old) != list(new):
                out.append(RuleChange(f"{path} (order)", list(old), list(new)))
            return
    out.append(RuleChange(path, before, after))


def _value(value: Any) -> Any:
    return None if value is _ABSENT else value


def _part(path: str, name: str, doc: Mapping[str, Any]) -> Any:
    """A field of ``doc``, or absent; an unset optional part of the document is absent."""
    value = doc.get(name, _ABSENT)
    return _ABSENT if not path and name in OPTIONAL_PARTS and value is None else value


def diff_rules(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[RuleChange]:
    """What differs from the document ``before`` to ``after``, field by field (the
    ``version`` field aside), in document order; an unset optional part equals an
    absent one."""
    old = {k: v for k, v in before.items() if k != "version"}
    new = {k: v for k, v in after.items() if k != "version"}
    out: list[RuleChange] = []
    _walk("", old, new, None, out)
    return out


@dataclass(frozen=True, slots=True)
class RuleVersion:
    """A stored version: its document, when it was stored and by whom (a key's name)."""

    version: int
    stored_at: datetime
    author: str | None
    wire: dict[str, Any]

    @property
    def by(self) -> str:
        if self.author:
            return self.author
        return "built in" if self.version == 1 else UNKNOWN_AUTHOR


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A version and what it changed from the one before (``previous`` None: the first
    version, nothing to compare with)."""

    version: RuleVersion
    previous: int | None
    changes: list[RuleChange]

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": self.version.version,
            "stored_at": self.version.stored_at.isoformat().replace("+00:00", "Z"),
            "author": self.version.author,
            "previous": self.previous,
            "changes": [c.to_wire() for c in self.changes],
        }


def history(versions: list[RuleVersion]) -> list[HistoryEntry]:
    """Each version (newest first, as given) with its changes from the next older one
    in ``versions`` (the oldest given has none to compare with unless it is version 1:
    give one more version than shown)."""
    entries = []
    for i, v in enumerate(versions):
        older = versions[i + 1] if i + 1 < len(versions) else None
        changes = [] if older is None else diff_rules(older.wire, v.wire)
        entries.append(HistoryEntry(v, None if older is None else older.version, changes))
    return entries
