"""The expiry index (``member_lots``) as the expiry job reads it, and the job's lease."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import orjson
import sqlalchemy as sa

from loyalty.adapters.db import Database, psycopg_connection
from loyalty.adapters.lease_keys import EXPIRY_LEASE
from loyalty.adapters.pipeline_store import ShardLeases
from loyalty.adapters.tables import member_lots, member_ranks
from loyalty.application.expiry import DueRow

"""In ShardLeases' namespace, beyond any shard number and the other jobs' keys."""


REMOVE_LOTS = (
    "DELETE FROM member_lots m USING jsonb_array_elements(%s::text::jsonb) e "
    "CROSS JOIN LATERAL (SELECT ctid FROM member_lots "
    "WHERE user_id = e->>1 AND lot = e->>0 LIMIT 1) k WHERE m.ctid = k.ctid"
)
"""Delete the (lot, user id) rows of a JSON array in one statement, each by its primary
key (the lateral probe: see "Lookups by a list of keys" in docs/architecture.md); the
per-row statements of an executemany were 13 % of an expiry run (py-spy)."""


class MemberLots:
    """``member_lots`` read in key order ``(lot, user_id)`` (its index), never scanned
    past the last due month."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def due(self, last_lot: str, after: DueRow | None, limit: int) -> list[DueRow]:
        c = member_lots.c
        query = sa.select(c.lot, c.user_id).where(c.lot <= last_lot)
        if after is not None:
            query = query.where(sa.tuple_(c.lot, c.user_id) > sa.tuple_(*after))
        query = query.order_by(c.lot, c.user_id).limit(limit)
        with self._db.read() as conn:
            return [(str(lot), str(user)) for lot, user in conn.execute(query)]

    def count_due(self, last_lot: str) -> int:
        c = member_lots.c
        with self._db.read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(member_lots).where(c.lot <= last_lot)
                ).scalar_one()
            )

    def ranked(self, keep: str | None, after: str | None, limit: int) -> list[str]:
        """Members holding a rank other than ``keep`` (the lowest rank, when it cannot
        be lost), by user id after ``after``."""
        c = member_ranks.c
        query = sa.select(c.user_id)
        if keep is not None:
            query = query.where(c.rank != keep)
        if after is not None:
            query = query.where(c.user_id > after)
        with self._db.read() as conn:
            return [str(u) for u in conn.execute(query.order_by(c.user_id).limit(limit)).scalars()]

    def remove(self, rows: Sequence[DueRow]) -> None:
        if not rows:
            return
        if self._db.backend == "postgresql":  # one statement, a key probe per row
            with self._db.write() as conn:
                psycopg_connection(conn).execute(
                    REMOVE_LOTS, (orjson.dumps([[lot, user] for lot, user in rows]).decode(),)
                )
            return
        c = member_lots.c
        with self._db.write() as conn:
            conn.execute(
                member_lots.delete().where(
                    c.lot == sa.bindparam("l"), c.user_id == sa.bindparam("u")
                ),
                [{"l": lot, "u": user} for lot, user in rows],
            )


class ExpiryLease:
    """One expiry run at a time: an advisory lock (PostgreSQL) or a lock file (SQLite),
    asked of the database before each batch, released at the end of the run."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @contextmanager
    def hold(self) -> Iterator[Callable[[], bool] | None]:
        leases = ShardLeases(self._db)
        try:
            if not leases.try_acquire(EXPIRY_LEASE):
                yield None
                return
            yield lambda: EXPIRY_LEASE in leases.held()
        finally:
            leases.release_all()
