"""One lease session per process and database (PostgreSQL).

A lease is a session advisory lock, so it needs a connection held for as long as the
lease lives. Each :class:`~loyalty.adapters.pipeline_store.ShardLeases` used to hold one
of its own: the pipeline child (its shards, forget-me, webhooks, expiry, the read-model
lease object) held four or five of the process's connections doing nothing, out of the
budget its work needed (``LOYALTY_DB_POOL_SIZE``). Every lease object of a process now
shares one connection per :class:`Database` (taken from its pool, so inside the budget),
used under a lock.

Advisory locks are re-entrant within a session: two lease objects of one process on the
same key would both "get" it. The session remembers which object owns each key and
refuses it to any other, so lease objects exclude each other within a process as leases
of two processes do. A failure of the connection ends the session, and with it every
lease of every object (the server released them): :attr:`generation` tells an object
that its leases died with an earlier session."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

import sqlalchemy as sa

from loyalty.adapters.db import Database


class LeaseSession:
    def __init__(self, db: Database) -> None:
        # the engine, not the Database: the value must not keep its weak key alive
        self._engine = db.engine
        self.lock = threading.RLock()
        self.conn: sa.Connection | None = None
        self.generation = 0
        self.owners: dict[int, Any] = {}  # key -> the lease object holding it

    def connection(self) -> sa.Connection:
        """The session's connection (opened on first use); call under :attr:`lock`."""
        if self.conn is None:
            self.conn = self._engine.connect()
        return self.conn

    def discard(self) -> None:
        """End the session (its locks end with it): the connection is invalidated, not
        returned to the pool, where the session and its locks would live on."""
        with self.lock:
            self.owners.clear()
            self.generation += 1
            if self.conn is not None:
                conn, self.conn = self.conn, None
                with contextlib.suppress(Exception):
                    conn.invalidate()
                    conn.close()


_SESSIONS: weakref.WeakKeyDictionary[Database, LeaseSession] = weakref.WeakKeyDictionary()
_SESSIONS_LOCK = threading.Lock()


def lease_session(db: Database) -> LeaseSession:
    """The process's lease session on ``db``."""
    with _SESSIONS_LOCK:
        found = _SESSIONS.get(db)
        if found is None:
            found = _SESSIONS[db] = LeaseSession(db)
        return found
