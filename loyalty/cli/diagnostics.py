"""``loyalty doctor`` and ``loyalty storage``: impossible states (found, repaired), and
where the rows and bytes are."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from loyalty.cli.common import echo_json, load_settings, open_database, stdout_console


def doctor_cmd(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="finish erasing orphan streams, release stale quarantine entries, "
            "erase read models of accounts without a stream",
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Find impossible states: member streams without their first event or with a gap,
    quarantined events, balance rows without a stream. Exits 1 when any is found
    (after --repair: when any is left)."""
    from loyalty.adapters.doctor import Doctor

    db = open_database(load_settings())
    try:
        doctor = Doctor(db)
        found = doctor.examine()
        repaired = doctor.repair(found) if repair else None
        after = doctor.examine() if repair else found
    finally:
        db.dispose()
    if json_output:
        wire: dict[str, object] = {"found": found.to_wire()}
        if repaired is not None:
            wire["repaired"] = repaired.to_wire()
            wire["after"] = after.to_wire()
        echo_json(wire)
    else:
        out = stdout_console(160)
        table = Table("check", "found", title=f"loyalty doctor, {found.backend}")
        table.add_row("streams without their first event", str(len(found.orphan_streams)))
        table.add_row("streams with a gap", str(len(found.gapped_streams)))
        table.add_row("quarantined events", str(found.quarantined))
        table.add_row("balance rows without a stream", str(len(found.balances_without_stream)))
        table.add_row("forget-me requests not completed", str(found.unfinished_forget_requests))
        table.add_row(
            "unfinished compensation runs (rules versions)",
            ", ".join(str(r["new_version"]) for r in found.unfinished_compensations) or "0",
        )
        out.print(table)
        for orphan in found.orphan_streams:
            out.print(
                f"orphan stream {orphan.member_id}: versions {orphan.first_version}-"
                f"{orphan.last_version} ({orphan.events} events)",
                highlight=False,
            )
        for gapped in found.gapped_streams:
            out.print(
                f"gap in stream {gapped.member_id}: {gapped.events} events in versions "
                f"{gapped.first_version}-{gapped.last_version}",
                highlight=False,
            )
        if repaired is not None:
            out.print(
                f"repaired: {repaired.orphan_streams_erased} orphan streams erased "
                f"({repaired.events_erased} events), {repaired.quarantine_released} "
                f"quarantine entries released, {repaired.read_models_erased} read-model rows "
                "erased",
                highlight=False,
            )
            for note in repaired.skipped:
                out.print(f"not repaired: {note}", highlight=False)
        out.print("healthy" if after.healthy else "problems remain", highlight=False)
    if not after.healthy:
        raise typer.Exit(1)


def storage_cmd(
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Rows and bytes per location: ingress partitions, event store, read models, the
    pipeline's and forget-me's tables, and the rest."""
    from loyalty.adapters.storage import storage_report

    db = open_database(load_settings())
    try:
        result = storage_report(db)
    finally:
        db.dispose()
    if json_output:
        echo_json(result.to_wire())
        return
    note = " (estimated: no dbstat)" if result.estimated else ""
    table = Table("location", "kind", "table", title=f"storage, {result.backend}{note}")
    table.add_column("rows", justify="right")
    table.add_column("bytes", justify="right")
    for loc in result.locations:
        table.add_row(loc.label, loc.kind_label, loc.name, f"{loc.rows:,}", f"{loc.bytes:,}")
    table.add_section()
    table.add_row("total", "", "", f"{result.total_rows:,}", f"{result.total_bytes:,}")
    table.add_row("database", "", "", "", f"{result.database_bytes:,}")
    stdout_console(120).print(table)
