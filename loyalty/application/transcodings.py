"""How member state JSON cannot hold goes into the event store (snapshots).

A snapshot stores the aggregate's ``vars()`` through the library's JSON transcoder: a set
would not encode at all, and a tuple would come back as a list (JSON has no tuple, and the
encoder writes tuples itself, never asking a transcoding) — so the state holds no tuples,
and sets and ``Adjustment`` values go through these transcodings."""

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import JSONTranscoder, Transcoding

from loyalty.domain.member import Adjustment


class SetAsList(Transcoding):
    """A set of strings as a sorted list (the same state, the same bytes)."""

    type = set
    name = "set"

    def encode(self, obj: set[str]) -> list[str]:
        return sorted(obj)

    def decode(self, data: list[str]) -> set[str]:
        return set(data)


class AdjustmentAsList(Transcoding):
    """An ``Adjustment`` as ``[currency, rank_points, reason]``."""

    type = Adjustment
    name = "adjustment"

    def encode(self, obj: Adjustment) -> list[Any]:
        return [obj.currency, obj.rank_points, obj.reason]

    def decode(self, data: list[Any]) -> Adjustment:
        currency, rank_points, reason = data
        return Adjustment(currency, rank_points, reason)


def register_member_transcodings(transcoder: JSONTranscoder) -> None:
    transcoder.register(SetAsList())
    transcoder.register(AdjustmentAsList())
