"""Award explanations (``award_explanations``), the pending row's explanation
(``pipeline_pending.explain``) and the ingress rows that contributed (see
``loyalty.application.explain``). Recorded awards' rows are written by the event insert
(``event_recorder``); compensations' rows by :meth:`ExplanationStore.put`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.tables import award_explanations, ingress_events, pipeline_pending
from loyalty.application.explain import (
    ContributingEvent,
    StoredExplanation,
    Window,
    pending_award_id,
)
from loyalty.domain import explain


def _when(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _window(shard: Any, a: Any, b: Any, c: Any, d: Any) -> Window | None:
    if shard is None or a is None or b is None or c is None or d is None:
        return None
    return Window(int(shard), (int(a), int(b)), (int(c), int(d)))


class ExplanationStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def recorded(self, user_id: str, award_id: str) -> StoredExplanation | None:
        c = award_explanations.c
        with self._db.read() as conn:
            r = conn.execute(
                sa.select(award_explanations).where(c.user_id == user_id, c.award_id == award_id)
            ).first()
        if r is None:
            return None
        return StoredExplanation(
            user_id=r.user_id,
            award_id=r.award_id,
            kind=r.kind,
            rule_version=int(r.rule_version),
            event_count=int(r.event_count),
            exact_currency=Decimal(r.exact_currency),
            exact_rank_points=Decimal(r.exact_rank_points),
            currency=int(r.currency),
            rank_points=int(r.rank_points),
            fraction_currency=Decimal(r.fraction_currency),
            fraction_rank_points=Decimal(r.fraction_rank_points),
            window=_window(r.shard, r.from_txid, r.from_seq, r.upto_txid, r.upto_seq),
            summary=explain.loads(r.summary) or dict(explain.EMPTY),
            recorded_at=_when(r.recorded_at),
        )

    def pending(self, user_id: str) -> StoredExplanation | None:
        c = pipeline_pending.c
        with self._db.read() as conn:
            r = conn.execute(sa.select(pipeline_pending).where(c.user_id == user_id)).first()
        if r is None:
            return None
        end = (int(r.upto_txid), int(r.upto_seq))
        window = _window(r.shard, r.from_txid, r.from_seq, *end)
        return StoredExplanation(
            user_id=r.user_id,
            award_id=pending_award_id(Window(int(r.shard), end, end)),
            kind="award",
            rule_version=int(r.rule_version),
            event_count=int(r.event_count),
            exact_currency=Decimal(r.currency),
            exact_rank_points=Decimal(r.rank_points),
            currency=0,
            rank_points=0,
            fraction_currency=Decimal(0),
            fraction_rank_points=Decimal(0),
            window=window,
            summary=explain.loads(r.explain) or dict(explain.EMPTY),
            recorded_at=None,
        )

    def contributing(
        self, user_id: str, window: Window, limit: int
    ) -> tuple[int, Sequence[ContributingEvent]]:
        c = ingress_events.c
        (a_txid, a_seq), (b_txid, b_seq) = window.start, window.end
        after = sa.or_(c.txid > a_txid, sa.and_(c.txid == a_txid, c.seq > a_seq))
        upto = sa.or_(c.txid < b_txid, sa.and_(c.txid == b_txid, c.seq <= b_seq))
        where = sa.and_(c.shard == window.shard, c.user_id == user_id, after, upto)
        with self._db.read() as conn:
            held = int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(ingress_events).where(where)
                ).one()[0]
            )
            rows = conn.execute(
                sa.select(c.source, c.event_id, c.type, sa.type_coerce(c.occurred_at, sa.Text))
                .where(where)
                .order_by(c.txid, c.seq)
                .limit(limit)
            ).all()
        return held, [ContributingEvent(r[0], r[1], r[2], _when(r[3])) for r in rows]


def stored_values(row: StoredExplanation) -> dict[str, Any]:
    """The ``award_explanations`` row of an explanation (exact decimals as text)."""
    return {
        "user_id": row.user_id,
        "award_id": row.award_id,
        "kind": row.kind,
        "rule_version": row.rule_version,
        "event_count": row.event_count,
        "exact_currency": f"{row.exact_currency:f}",
        "exact_rank_points": f"{row.exact_rank_points:f}",
        "currency": row.currency,
        "rank_points": row.rank_points,
        "fraction_currency": f"{row.fraction_currency:f}",
        "fraction_rank_points": f"{row.fraction_rank_points:f}",
        "summary": explain.dumps(row.summary),
        "recorded_at": row.recorded_at or datetime.now(UTC),
    }


def erase_explanations(conn: sa.Connection, user_id: str) -> int:
    """Forget-me: delete the member's award explanations in ``conn``'s transaction (the
    read models' erasure, after the stream's: no insert can add one any more)."""
    c = award_explanations.c
    return int(conn.execute(award_explanations.delete().where(c.user_id == user_id)).rowcount)
