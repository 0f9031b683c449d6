"""``loyalty doctor``: find impossible states of the stores, and repair the ones with one
safe repair.

Found (each a scan or an anti-join, cheap enough for an operator command):

- streams without their first event (``orphan_streams``): left by the forget-me race
  fixed in 0005 (a save from a stale copy into an erased stream). Every read of such an
  account fails and the projection quarantines its events. Repair: finish erasing them
  (the same deletion as forget-me's, under the event insert's lock) and release their
  quarantine entries;
- streams with a gap in their versions (``gapped_streams``): reported only (no safe
  automatic repair; they cannot be read);
- quarantined events (``quarantined``): released when their stream no longer exists
  (erased or repaired); entries of streams that exist are kept (fix the cause, then
  ``loyalty projections rebuild``);
- balance rows without a stream (``balances_without_stream``): a read model of an erased
  account. Repair: erase the member's read-model rows, unless a forget-me request is
  still running (it erases them itself);
- unfinished compensation runs (``unfinished_compensations``: ``rules apply
  --compensate`` runs still ``running``, e.g. killed): reported only; finish one with
  ``loyalty rules compensation resume V`` (or the next ``rules apply --compensate``), or
  end it with ``loyalty rules compensation abandon V``.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from loyalty.adapters.compensation_store import CompensationStore
from loyalty.adapters.db import Database
from loyalty.adapters.event_store import erase_stream
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.read_models import erase_member as erase_read_models

NIL = uuid.UUID(int=0)


@dataclass(slots=True)
class StreamState:
    member_id: str
    first_version: int
    last_version: int
    events: int


@dataclass(slots=True)
class DoctorReport:
    backend: str
    orphan_streams: list[StreamState] = field(default_factory=list)
    gapped_streams: list[StreamState] = field(default_factory=list)
    quarantined: int = 0
    quarantined_streams: list[str] = field(default_factory=list)
    balances_without_stream: list[str] = field(default_factory=list)
    """user ids"""
    unfinished_forget_requests: int = 0
    unfinished_compensations: list[dict[str, Any]] = field(default_factory=list)
    """compensation runs still running: versions and times (no user id)"""

    @property
    def healthy(self) -> bool:
        return not (
            self.orphan_streams
            or self.gapped_streams
            or self.quarantined
            or self.balances_without_stream
            or self.unfinished_compensations
        )

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["healthy"] = self.healthy
        return wire


@dataclass(slots=True)
class RepairReport:
    orphan_streams_erased: int = 0
    events_erased: int = 0
    quarantine_released: int = 0
    read_models_erased: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


class Doctor:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pg = db.backend == "postgresql"
        self._events = "members_events" if self._pg else "stored_events"

    def _member_id(self, raw: Any) -> str:
        return str(raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw)))

    def _has_events_table(self, conn: sa.Connection) -> bool:
        return sa.inspect(conn).has_table(self._events)

    def examine(self) -> DoctorReport:
        report = DoctorReport(self._db.backend)
        nil: Any = NIL if self._pg else NIL.hex
        with self._db.read() as conn:
            if self._has_events_table(conn):
                rows = conn.execute(
                    sa.text(
                        "SELECT originator_id, min(originator_version), max(originator_version), "
                        f"count(*) FROM {self._events} WHERE originator_id <> :nil "
                        "GROUP BY originator_id HAVING min(originator_version) > 1 "
                        "OR count(*) <> max(originator_version) - min(originator_version) + 1"
                    ),
                    {"nil": nil},
                ).all()
                for raw, first, last, count in rows:
                    state = StreamState(self._member_id(raw), int(first), int(last), int(count))
                    if state.first_version > 1:
                        report.orphan_streams.append(state)
                    else:
                        report.gapped_streams.append(state)
                match = (
                    "e.originator_id = CAST(b.member_id AS uuid)"
                    if self._pg
                    else "e.originator_id = replace(b.member_id, '-', '')"
                )
                report.balances_without_stream = sorted(
                    r[0]
                    for r in conn.execute(
                        sa.text(
                            "SELECT b.user_id FROM member_balances b WHERE NOT EXISTS "
                            f"(SELECT 1 FROM {self._events} e WHERE {match})"
                        )
                    )
                )
            report.unfinished_forget_requests = int(
                conn.execute(
                    sa.text("SELECT count(*) FROM forget_requests WHERE status <> 'completed'")
                ).scalar_one()
            )
        report.unfinished_compensations = CompensationStore(self._db).unfinished_summary()
        read_models = ReadModels(self._db)
        report.quarantined = read_models.quarantined_count()
        report.quarantined_streams = sorted(
            {q.event.member_id for q in read_models.quarantined(limit=100_000)}
        )
        return report

    def _stream_exists(self, member_id: str) -> bool:
        key: Any = uuid.UUID(member_id) if self._pg else uuid.UUID(member_id).hex
        with self._db.read() as conn:
            return (
                conn.execute(
                    sa.text(f"SELECT 1 FROM {self._events} WHERE originator_id = :m LIMIT 1"),
                    {"m": key},
                ).first()
                is not None
            )

    def repair(self, report: DoctorReport) -> RepairReport:
        """Finish erasing orphan streams, release quarantine entries of streams that no
        longer exist, erase read models of accounts without a stream. Idempotent."""
        done = RepairReport()
        read_models = ReadModels(self._db)
        released: set[str] = set()
        for orphan in report.orphan_streams:
            # under the same lock as forget-me's deletion: a concurrent save either
            # commits first (and is deleted too) or finds its predecessor gone
            done.events_erased += erase_stream(self._db, orphan.member_id)
            done.orphan_streams_erased += 1
            released.add(orphan.member_id)
        released.update(m for m in report.quarantined_streams if not self._stream_exists(m))
        if released:
            done.quarantine_released += read_models.release_quarantined(released)
        for gapped in report.gapped_streams:
            done.skipped.append(f"stream {gapped.member_id} has a gap: not repaired")
        for run in report.unfinished_compensations:
            version = run["new_version"]
            done.skipped.append(
                f"compensation run of rules v{version} is unfinished: finish it with "
                f"`loyalty rules compensation resume {version}` or end it with "
                f"`loyalty rules compensation abandon {version}`"
            )
        if report.balances_without_stream:
            if report.unfinished_forget_requests:
                done.skipped.append(
                    "balance rows without a stream left alone: a forget-me request is still "
                    "running (it erases them); run the doctor again when it is done"
                )
            else:
                for user_id in report.balances_without_stream:
                    erased = erase_read_models(self._db, user_id)
                    done.read_models_erased += sum(erased.values())
        return done
