"""Versioned weighting rules. Version 1 is the built-in default, stored on first use."""

from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime

import orjson
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.tables import rule_compensations, rule_versions
from loyalty.application.commands.rules import parse_rule_set, rule_set_to_wire
from loyalty.application.rule_history import RuleVersion
from loyalty.domain.expiry import month_of
from loyalty.domain.rules import DEFAULT_RULES_WIRE, RuleSet

MAX_VERSION = 2**31 - 1
"""The highest version ``rule_versions.version`` (INTEGER) can hold."""


class RulesStore:
    def __init__(self, db: Database, cache_seconds: float = 1.0) -> None:
        self._db = db
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, RuleSet] | None = None
        self._lock = threading.Lock()
        self._versions: dict[int, RuleSet] = {}  # stored versions never change

    def at(self, version: int) -> RuleSet:
        """Stored version ``version`` (kept once read: a version never changes)."""
        found = self._versions.get(version)
        if found is None:
            if version == 1:
                self.current()  # make sure version 1 (the default) exists
            stored = self.version(version)
            if stored is None:
                raise LookupError(f"rules version {version} is not stored")
            found = self._versions[version] = stored[0]
        return found

    def current(self) -> RuleSet:
        """The newest rule set (re-read at most every ``cache_seconds``)."""
        cached = self._cached
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(rule_versions.c.version, rule_versions.c.body)
                .order_by(rule_versions.c.version.desc())
                .limit(1)
            ).first()
        if row is None:
            rule_set = self._store_default()
        else:
            rule_set = parse_rule_set(orjson.loads(row[1]), row[0], require_rank=False)
        with self._lock:
            self._cached = (time.monotonic() + self._cache_seconds, rule_set)
        return rule_set

    def _store_default(self) -> RuleSet:
        rule_set = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1)
        stmt = _insert_ignore(self._db, 1, rule_set)
        with self._db.write() as conn:
            conn.execute(stmt)
        return self.current_uncached()

    def current_uncached(self) -> RuleSet:
        self._cached = None
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(rule_versions.c.version, rule_versions.c.body)
                .order_by(rule_versions.c.version.desc())
                .limit(1)
            ).first()
        if row is None:
            return self._store_default()
        return parse_rule_set(orjson.loads(row[1]), row[0], require_rank=False)

    def version(self, version: int) -> tuple[RuleSet, datetime] | None:
        """A stored version and when it was stored."""
        c = rule_versions.c
        with self._db.read() as conn:
            row = conn.execute(sa.select(c.body, c.created_at).where(c.version == version)).first()
        if row is None:
            return None
        created = row[1] if row[1].tzinfo is not None else row[1].replace(tzinfo=UTC)
        return parse_rule_set(orjson.loads(row[0]), version, require_rank=False), created

    def put(
        self,
        wire: dict[str, object],
        now: datetime | None = None,
        *,
        compensate_since: datetime | None = None,
        author: str | None = None,
    ) -> RuleSet:
        """Validate and store a new version (raises InvalidRules), with ``author`` (the
        name of the key that stores it, kept with the version for its history). With
        ``compensate_since``, the version's compensation run (``rule_compensations``,
        state ``running``) is inserted in the same transaction: a run is never lost
        between the two, whatever crashes or rules changes follow.

        Currency expiry without ``effective_from`` is stamped with the month expiry was
        turned on: the previous version's, if it had expiry on, else the month of
        ``now``; so turning expiry on never expires currency earned before unless the
        operator says so (``retroactive``, or an explicit ``effective_from``)."""
        parsed = parse_rule_set(wire, 1)  # validate before touching the database
        previous = self.current()  # make sure version 1 (the default) exists
        expiry = parsed.currency_expiry
        if expiry is not None and expiry.effective_from is None:
            before = previous.currency_expiry
            stamp = (
                before.effective_from
                if before is not None and before.effective_from is not None
                else month_of(now or datetime.now(UTC))
            )
            raw = wire["currency_expiry"]
            assert isinstance(raw, dict)
            wire = {**wire, "currency_expiry": {**raw, "effective_from": stamp}}
        for _ in range(20):
            with self._db.write() as conn:
                latest = conn.execute(sa.select(sa.func.max(rule_versions.c.version))).scalar()
                version = int(latest or 0) + 1
                rule_set = parse_rule_set(wire, version)
                stored_at = datetime.now(UTC)
                stmt = _insert_ignore(self._db, version, rule_set, stored_at, author)
                if conn.execute(stmt.returning(rule_versions.c.version)).first() is not None:
                    if compensate_since is not None:
                        conn.execute(
                            rule_compensations.insert().values(
                                new_version=version,
                                old_version=version - 1,
                                since=compensate_since,
                                until=stored_at,
                                state="running",
                                started_at=stored_at,
                            )
                        )
                    self._cached = None
                    return rule_set
        raise RuntimeError("could not store a new rules version after 20 attempts")

    def versions(self, limit: int = 100, before: int | None = None) -> list[RuleVersion]:
        """The stored versions older than ``before`` (all: None), newest first, with
        their documents, when and by whom they were stored (keyset paging on the
        version)."""
        self.current()  # make sure version 1 (the default) exists
        r = rule_versions.c
        query = sa.select(r.version, r.created_at, r.author, r.body)
        if before is not None and before <= MAX_VERSION:  # past every version: all of them
            query = query.where(r.version < before)
        with self._db.read() as conn:
            rows = conn.execute(query.order_by(r.version.desc()).limit(limit)).all()
        return [
            RuleVersion(
                int(v),
                at if at.tzinfo else at.replace(tzinfo=UTC),
                author,
                rule_set_to_wire(parse_rule_set(orjson.loads(body), int(v), require_rank=False)),
            )
            for v, at, author, body in rows
        ]


def _insert_ignore(
    db: Database,
    version: int,
    rule_set: RuleSet,
    at: datetime | None = None,
    author: str | None = None,
) -> sa.Insert:
    body = orjson.dumps(rule_set_to_wire(rule_set)).decode()
    values = {
        "version": version,
        "body": body,
        "created_at": at or datetime.now(UTC),
        "author": author,
    }
    if db.backend == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(rule_versions).values(**values).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(rule_versions).values(**values).on_conflict_do_nothing()
