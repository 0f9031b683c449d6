"""Pending earnings: what the pipeline has counted for a member and not yet recorded.

The pipeline adds each window's exact contribution per member to the member's pending
row in the transaction that advances the shard's checkpoint (``PipelineStore.commit``),
so each ingress event is counted exactly once. A *recording* turns a member's whole
pending row into one ``Awarded`` event on the account (whole units of the carried
fraction plus pending are credited, the exact rest is carried on the account) and deletes
the row **in the event insert's own transaction**, only if the row is still the one that
was read (its revision: the end of the last window that changed it; window ends of a
shard only grow and a member lives in one shard, so a revision is never reused). A row
changed since (a window committed more) fails the insert with :class:`PendingMoved`,
which rolls the event back; the recording is retried from a fresh read. Hence nothing is
recorded twice or lost, whatever crashes, and no idempotency set is needed.

Recordings happen (a) when the row is older than the award interval (the worker, after
each drain), (b) at once when pending would lift the member into a higher rank (the row
holds the rank points still needed, ``rank_need``, set from the account when the row is
new, judged by ``Member.rank_need`` as the recording will judge it: under a qualification
period, the points of the period ending on the row's day against the rank held; cleared
by the merge when a contribution comes under another rules version) or the member has no
account yet, and (c) together with a spend, refund or adjustment of the member, or the
expiry job's read of it, in that save.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from eventsourcing.persistence import IntegrityError

from loyalty.domain.pending import Contribution as Contribution
from loyalty.domain.pending import PendingRow as PendingRow
from loyalty.domain.pending import Position as Position

PENDING = "pending_consumed"
"""Keyword of ``Application.save``: ``{user_id: revision}`` of the pending rows the saved
events record; the insert deletes them in its transaction, or fails."""

EXPLAINED = "pending_explained"
"""Keyword of ``Application.save``: ``[(user_id, txid, seq, award_id, currency,
rank_points, fraction_currency, fraction_rank_points)]`` of the awards recording those rows;
the insert copies each row's explanation into ``award_explanations`` before deleting it."""


class PendingMoved(IntegrityError):
    """A pending row recorded by a save was changed or removed since it was read: the
    save is rolled back; read again and retry."""

    def __init__(self, user_ids: Collection[str]) -> None:
        super().__init__(f"pending changed for {len(user_ids)} member(s)")
        self.user_ids = sorted(user_ids)


class PendingStore(Protocol):
    def load(self, user_ids: Iterable[str]) -> dict[str, PendingRow]: ...
    def one(self, user_id: str, *, beside_stream: bool = False) -> PendingRow | None:
        """One member's row (``beside_stream``: a view's read, on the connections that
        read the member's stream, where commands' saves may hold them all)."""
        ...

    def due(self, shards: Collection[int], before: datetime, limit: int) -> list[str]: ...
    def unsettled(self, shards: Collection[int], limit: int) -> list[PendingRow]: ...
    def set_needs(self, needs: Sequence[tuple[str, Position, Decimal | None]]) -> None: ...
    def discard(self, user_id: str, upto: Position) -> bool: ...


def award_id_for(shard: int, end: Position) -> str:
    """The award id of a window end (and of a recording up to it): ``w{shard}.{txid}.{seq}``,
    the same on every replay; per shard strictly increasing (``Member.has_award``)."""
    return f"w{shard}.{end[0]}.{end[1]}"


def revisions(rows: Iterable[PendingRow]) -> Mapping[str, Position]:
    return {row.user_id: row.upto for row in rows}
