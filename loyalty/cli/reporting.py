"""``loyalty report`` and ``loyalty export``: the daily rollups, as a table and chart,
and as Parquet files for a warehouse."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from loyalty.cli.common import echo_json, fail, load_settings, open_database, stdout_console


def _day(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    from pydantic import ValidationError

    from loyalty.application.commands.fields import DAY

    try:  # the API's bounded day (loyalty.domain.limits), as GET /v1/reports/daily
        return DAY.validate_strings(value.strip())
    except ValidationError as exc:
        reason = exc.errors(include_url=False, include_input=False)[0]["msg"]
        raise fail(f"{option} {value!r}: not a day (YYYY-MM-DD): {reason}", 2) from None


def _range(first: str | None, last: str | None, days: int) -> tuple[date, date]:
    to = _day(last, "--to") or datetime.now(UTC).date()
    start = _day(first, "--from") or to - timedelta(days=days - 1)
    if to < start:
        raise fail("--to is before --from", 2)
    return start, to


def report(
    first: Annotated[
        str | None, typer.Option("--from", help="first UTC day (default: --days before --to)")
    ] = None,
    last: Annotated[str | None, typer.Option("--to", help="last UTC day (default: today)")] = None,
    days: Annotated[int, typer.Option(min=1, max=3660, help="days, when --from is not given")] = 7,
    out: Annotated[
        Path | None, typer.Option(help="also write a PNG chart here (e.g. report.png)")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print GET /v1/reports/daily's JSON")
    ] = False,
) -> None:
    """Per UTC day: events by type, awards, spending, outstanding currency, members
    (from the daily rollups: past days read the same after retention)."""
    from loyalty.adapters.rollup_store import RollupStore
    from loyalty.adapters.rules_store import RulesStore
    from loyalty.application.reporting import ReportRangeError, daily_report
    from loyalty.report import render_table, write_chart

    start, to = _range(first, last, days)
    db = open_database(load_settings())
    try:
        weighed = RulesStore(db).current().rules.keys()
        result = daily_report(RollupStore(db), start, to, weighed)
    except ReportRangeError as exc:
        raise fail(str(exc), 2) from None
    finally:
        db.dispose()
    if json_output:
        body = {"days": [d.to_wire() for d in result]}
        echo_json(body)
    else:
        # Not a terminal (a pipe, a file): wide enough that no column is cut.
        stdout_console(200).print(render_table(result))
    if out is not None:
        try:
            write_chart(result, out)
        except OSError as exc:
            raise fail(f"{out}: {exc.strerror or exc}", 1) from None
        typer.echo(f"chart written to {out}", err=json_output)


def export_cmd(
    first: Annotated[str, typer.Option("--from", help="first UTC day (YYYY-MM-DD)")],
    last: Annotated[str, typer.Option("--to", help="last UTC day, inclusive")],
    out: Annotated[Path, typer.Option(help="directory of the files (made if missing)")],
    file_format: Annotated[
        str, typer.Option("--format", help="file format (parquet is the one there is)")
    ] = "parquet",
    rollups_only: Annotated[
        bool, typer.Option(help="only the rollups (no account events, no key needed)")
    ] = False,
) -> None:
    """Write the daily rollups and the account events (members as keyed pseudonyms) as
    Parquet files, one per dataset and UTC day (OUT/<dataset>/day=YYYY-MM-DD/), each
    atomically; days that can no longer change and are already exported are skipped."""
    from loyalty.adapters.event_store import (
        event_store_env,
        notification_reader,
        plain_decoder,
    )
    from loyalty.adapters.parquet_export import ParquetSink
    from loyalty.adapters.rollup_store import RollupStore
    from loyalty.application.accounts import Members
    from loyalty.application.collector import cyclic_gc_paused
    from loyalty.application.reporting import ExportRefused, MembersLog, ReportRangeError, export
    from loyalty.application.retention import cutoff_day

    if file_format != "parquet":
        raise fail(f"--format {file_format!r}: only parquet", 2)
    start, to = _range(first, last, 1)
    settings = load_settings()
    key = settings.export_pseudonym_key
    db = open_database(settings)
    members = Members(env=event_store_env(settings))
    now = datetime.now(UTC)
    try:
        with cyclic_gc_paused():  # an export makes no reference cycles: none to collect
            result = export(
                RollupStore(db),
                MembersLog(members, plain_decoder(members), notification_reader(members.recorder)),
                ParquetSink(out),
                start,
                to,
                key=None if key is None else key.get_secret_value().encode(),
                # no ingress is accepted for a day before the retention cutoff, and no account
                # event is stamped with a day before today: such a day is final
                final_before=min(cutoff_day(now, settings.retention_days), now.date()),
                events=not rollups_only,
            )
    except ExportRefused as exc:
        raise fail(str(exc), 2) from None
    except ReportRangeError as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:
        raise fail(f"{out}: {exc.strerror or exc}", 1) from None
    finally:
        members.close()
        db.dispose()
    written = ", ".join(f"{n} {name}" for name, n in result.written.items())
    skipped = sum(result.skipped.values())
    typer.echo(
        f"exported {start} to {to} into {out}: files written: {written}; "
        f"{result.events:,} account events; {skipped} complete day files skipped"
    )
