"""Parquet files of the export (``loyalty.application.reporting.export``), with pyarrow.

Layout, one file per dataset and UTC day (Hive partitioning, so any engine reads the
day as a column)::

    OUT/activity/day=2026-11-28/part-0.parquet        per source x event type
    OUT/accounts/day=2026-11-28/part-0.parquet        the day's figures (one row)
    OUT/account_events/day=2026-11-28/part-0.parquet  the account events, pseudonymous

A file is written under a temporary name in its own directory (``.part-0.parquet.<pid>.tmp``,
which no ``*.parquet`` glob matches), fsynced, renamed over the final name and the
directory fsynced: a reader sees the whole file or none, and a crash leaves at most a
temporary file that the next export of that day removes. Exact decimal sums are written
as DECIMAL(38, 12) (rounded half-even past 12 decimal places, which no weight of a
rule set needs in practice); counts as INT64; times as TIMESTAMP (UTC, microseconds).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loyalty.application.reporting import DAY_COLUMNS, EventColumns

FILE = "part-0.parquet"
SCALE = Decimal(1).scaleb(-12)
DECIMAL = pa.decimal128(38, 12)
EVENT_BATCH_ROWS = 65_536
AT = pa.timestamp("us", tz="UTC")

ACTIVITY = pa.schema(
    [
        ("source", pa.string()),
        ("event_type", pa.string()),
        ("events", pa.int64()),
        ("earning_events", pa.int64()),
        ("members", pa.int64()),
        ("currency_awarded", DECIMAL),
        ("rank_points_awarded", DECIMAL),
    ]
)
_ACCOUNT_INTS = tuple(
    name for name in DAY_COLUMNS if name not in ("day", "currency_awarded", "rank_points_awarded")
)
ACCOUNTS = pa.schema(
    [
        *((name, pa.int64()) for name in _ACCOUNT_INTS),
        ("currency_awarded", DECIMAL),
        ("rank_points_awarded", DECIMAL),
        ("members_per_rank", pa.string()),  # a JSON object: rank -> members
    ]
)
ACCOUNT_EVENTS = pa.schema(
    [
        ("position", pa.int64()),
        ("member", pa.string()),
        ("version", pa.int64()),
        ("type", pa.string()),
        ("at", AT),
        ("currency", pa.int64()),
        ("rank_points", pa.int64()),
        ("ref", pa.string()),
        ("source", pa.string()),
    ]
)
SCHEMAS = {"activity": ACTIVITY, "accounts": ACCOUNTS, "account_events": ACCOUNT_EVENTS}


def _decimal(value: Any) -> Decimal:
    return Decimal(value).quantize(SCALE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetSink:
    def __init__(self, out: Path) -> None:
        self.out = out

    def _dir(self, dataset: str, day: date) -> Path:
        return self.out / dataset / f"day={day.isoformat()}"

    def complete(self, dataset: str, day: date) -> bool:
        return (self._dir(dataset, day) / FILE).is_file()

    def _temporary(self, dataset: str, day: date) -> tuple[Path, Path]:
        folder = self._dir(dataset, day)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".{FILE}.*.tmp"):  # left by an export that was killed
            stale.unlink(missing_ok=True)
        return folder / f".{FILE}.{os.getpid()}.tmp", folder / FILE

    @staticmethod
    def _publish(temporary: Path, final: Path) -> int:
        os.replace(temporary, final)
        _fsync_dir(final.parent)
        return final.stat().st_size

    def write_rows(self, dataset: str, day: date, rows: Sequence[Mapping[str, Any]]) -> int:
        schema = SCHEMAS[dataset]
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for row in rows:
            for name in schema.names:
                value = row[name]
                if name == "members_per_rank":
                    value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
                elif pa.types.is_decimal(schema.field(name).type):
                    value = _decimal(value)
                columns[name].append(value)
        table = pa.table(columns, schema=schema)
        temporary, final = self._temporary(dataset, day)
        try:
            with open(temporary, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            return self._publish(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)

    def write_events(self, days: set[date], pages: Iterable[EventColumns]) -> dict[date, int]:
        files = {day: self._temporary("account_events", day) for day in sorted(days)}
        handles = {day: open(tmp, "wb") for day, (tmp, _) in files.items()}  # noqa: SIM115
        writers = {day: pq.ParquetWriter(handles[day], ACCOUNT_EVENTS) for day in files}
        buffers: dict[date, list[pa.RecordBatch]] = {day: [] for day in files}
        buffered = dict.fromkeys(files, 0)
        counts = dict.fromkeys(files, 0)

        def flush(day: date) -> None:
            writers[day].write_table(pa.Table.from_batches(buffers[day], ACCOUNT_EVENTS))
            counts[day] += buffered[day]
            buffers[day].clear()
            buffered[day] = 0

        try:
            for page in pages:
                for day, part in _by_day(page, files):
                    buffers[day].append(part)
                    buffered[day] += part.num_rows
                    if buffered[day] >= EVENT_BATCH_ROWS:
                        flush(day)
            for day in files:
                if buffered[day]:
                    flush(day)
                writers[day].close()
                handles[day].flush()
                os.fsync(handles[day].fileno())
                handles[day].close()
            for temporary, final in files.values():
                self._publish(temporary, final)
        finally:
            for day, (temporary, _) in files.items():
                if writers[day].is_open:  # an error cut the export short
                    writers[day].close()
                handles[day].close()
                temporary.unlink(missing_ok=True)
        return counts


def _by_day(page: EventColumns, days: Iterable[date]) -> Iterator[tuple[date, pa.RecordBatch]]:
    """The page's events of each of ``days`` (the UTC date of ``at``) whose member is named,
    as a record batch per day (vectorised: a page is mapped and split in Arrow)."""
    at = pa.array(page.at, AT)
    batch = pa.record_batch(
        [
            pa.array(page.position, pa.int64()),
            pa.array(page.member, pa.string()),
            pa.array(page.version, pa.int64()),
            pa.array(page.type, pa.string()),
            at,
            pa.array(page.currency, pa.int64()),
            pa.array(page.rank_points, pa.int64()),
            pa.array(page.ref, pa.string()),
            pa.array(page.source, pa.string()),
        ],
        schema=ACCOUNT_EVENTS,
    )
    named = pc.is_valid(batch.column("member"))
    day_of = pc.cast(at, pa.date32())
    for day in days:
        part = batch.filter(pc.and_(named, pc.equal(day_of, pa.scalar(day, pa.date32()))))
        if part.num_rows:
            yield day, part
