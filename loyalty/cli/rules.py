"""``loyalty rules``: show and load the weighting rules, their history, try a change on past events
(dry-run), apply one to past awards, and its compensation runs (issue 20)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from loyalty.cli.common import (
    echo_json,
    err,
    fail,
    load_settings,
    open_database,
    rfc3339_option,
)

rules_app = typer.Typer(
    help="The weighting rules: show, load, their history (who changed what), try a change "
    "on past events (dry-run), apply a change to past awards, and its compensation runs.",
    no_args_is_help=True,
)


def read_rules_file(file: str) -> dict[str, Any]:
    """A rules file (``-``: stdin) as a JSON object, read as ``PUT /v1/rules`` reads its
    body (:func:`loyalty.api.schemas.rules_document`: an object repeating a key is
    refused), or a clear error (exit 2)."""
    from loyalty.api.guards import BodyProblem
    from loyalty.api.schemas import rules_document

    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise fail(f"{file}: {exc.strerror or exc}", 2) from None
    try:
        return rules_document(raw)
    except BodyProblem as exc:
        cause = exc.__cause__
        if exc.code == "invalid_rules":
            raise fail(f"{file}: must be a JSON object with 'rules' and 'ranks'", 2) from None
        detail = f"{exc.detail}: {cause}" if cause is not None else exc.detail
        raise fail(f"{file}: {detail}", 2) from None


def cli_author() -> str:
    """The author a rules version stored from the command line is recorded with: the
    operating-system user (there is no API key), as ``cli:<user>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"[:128]
    except (OSError, KeyError):  # no user name in the environment or the password file
        return "cli"


@rules_app.command("show")
def rules_show(
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="a stored version (default: current)")
    ] = None,
) -> None:
    """Print the current rules (or --version N) as JSON with every field, the optional
    ones as null when unset (the output loads back with `rules load`); who stored the
    version and when goes to stderr."""
    from loyalty.adapters.rules_store import RulesStore
    from loyalty.application.rule_history import full_wire

    db = open_database(load_settings())
    try:
        store = RulesStore(db)
        current = store.current()
        found = store.versions(1, before=(version or current.version) + 1)
    finally:
        db.dispose()
    if not found or found[0].version != (version or current.version):
        raise fail(f"rules version {version} is not stored (current: {current.version})", 2)
    stored = found[0]
    note = " (current)" if stored.version == current.version else ""
    err.print(
        f"version {stored.version}{note}, stored {stored.stored_at:%Y-%m-%dT%H:%M:%SZ} by "
        f"{stored.by}",
        soft_wrap=True,
        highlight=False,
    )
    echo_json(full_wire(stored.wire))


@rules_app.command("history")
def rules_history(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="versions to show")] = 10,
    before: Annotated[
        int | None, typer.Option(min=2, help="only versions older than this one (paging)")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The stored rules versions, newest first: when, who (the key's name, or cli:<user>)
    and what changed from the version before, field by field."""
    from loyalty.adapters.rules_store import RulesStore
    from loyalty.application.rule_history import history

    db = open_database(load_settings())
    try:
        versions = RulesStore(db).versions(limit + 1, before=before)
    finally:
        db.dispose()
    entries = history(versions)[:limit]
    if json_output:
        echo_json({"versions": [e.to_wire() for e in entries]})
        return
    for e in entries:
        v = e.version
        typer.echo(f"version {v.version}  {v.stored_at:%Y-%m-%dT%H:%M:%SZ}  by {v.by}")
        if e.previous is None:
            typer.echo("  (the first version: nothing to compare with)")
        elif not e.changes:
            typer.echo(f"  no change from version {e.previous}")
        else:
            typer.echo(f"  changes from version {e.previous}:")
            for change in e.changes:
                typer.echo(f"    {change.describe()}")
    if len(versions) > limit:
        typer.echo(f"older versions: loyalty rules history --before {entries[-1].version.version}")


@rules_app.command("load")
def rules_load(
    file: Annotated[
        str, typer.Argument(help="a JSON file {rules:[...], ranks:[...]}; - reads stdin")
    ],
) -> None:
    """Validate a rules file like PUT /v1/rules and store it as the next version."""
    from loyalty.adapters.rules_store import RulesStore
    from loyalty.domain.errors import InvalidRules

    wire = read_rules_file(file)
    db = open_database(load_settings())
    try:
        rule_set = RulesStore(db).put(wire, author=cli_author())
    except InvalidRules as exc:
        raise fail(f"{file}: {exc.message}", 2) from None
    finally:
        db.dispose()
    typer.echo(f"loaded rules version {rule_set.version}")


@rules_app.command("dry-run")
def rules_dry_run(
    file: Annotated[str, typer.Argument(help="a candidate rules file; - reads stdin")],
    from_: Annotated[
        str | None,
        typer.Option("--from", help="first UTC day, YYYY-MM-DD (default: the day before --to)"),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="last UTC day, included, YYYY-MM-DD (default: today)"),
    ] = None,
) -> None:
    """Weigh retained days with a candidate rule set and compare with the current rules
    (read-only); prints the report as JSON (the shape of POST /v1/rules/dry-run)."""
    from loyalty.application.commands.rules import parse_rule_set
    from loyalty.bootstrap import build_dry_run
    from loyalty.domain.errors import InvalidRules, PeriodNotRetained

    wire = read_rules_file(file)
    try:
        candidate = parse_rule_set(wire, 0)
    except InvalidRules as exc:
        raise fail(f"{file}: {exc.message}", 2) from None
    settings = load_settings()
    db = open_database(settings)
    try:
        report = build_dry_run(db, settings).run(candidate, from_, to)
    except PeriodNotRetained as exc:
        raise fail(exc.message, 2) from None
    finally:
        db.dispose()
    for warning in report["warnings"]:
        err.print(f"warning: {warning}", soft_wrap=True, highlight=False)
    echo_json(report)


@rules_app.command("apply")
def rules_apply(
    file: Annotated[str, typer.Argument(help="the new rules file; - reads stdin")],
    since: Annotated[
        str | None,
        typer.Option(help="RFC 3339: compensate from the start of this UTC day"),
    ] = None,
    compensate: Annotated[
        bool,
        typer.Option(
            "--compensate",
            help="give each affected member one compensating adjustment for the period",
        ),
    ] = False,
) -> None:
    """Make a rules file current; with --compensate, also compensate every member for
    what the new rules would have awarded since --since for the events weighed under the
    older rules (idempotent: a re-run finishes an interrupted run and then does nothing;
    any unfinished run is finished first, whatever rules were stored since). Prints the
    receipt as JSON."""
    from loyalty.adapters.rules_store import RulesStore
    from loyalty.application.commands.rules import parse_rule_set
    from loyalty.bootstrap import build_compensation
    from loyalty.domain.errors import InvalidRules, PeriodNotRetained

    wire = read_rules_file(file)
    try:
        candidate = parse_rule_set(wire, 0)
    except InvalidRules as exc:
        raise fail(f"{file}: {exc.message}", 2) from None
    if compensate and since is None:
        raise fail("--compensate needs --since", 2)
    settings = load_settings()
    db = open_database(settings)
    try:
        if not compensate:
            rule_set = RulesStore(db).put(wire, author=cli_author())
            typer.echo(f"loaded rules version {rule_set.version} (no compensation)")
            return
        assert since is not None
        receipt = build_compensation(db).apply(
            wire, rfc3339_option(since, "--since"), candidate, cli_author()
        )
    except PeriodNotRetained as exc:
        raise fail(
            f"{exc.message} (an unfinished run is finished first: see "
            "`loyalty rules compensation list`, and abandon one that can no longer finish)",
            2,
        ) from None
    finally:
        db.dispose()
    echo_json(receipt)


compensation_app = typer.Typer(
    help="Compensation runs of `rules apply --compensate`: list, resume, abandon.",
    no_args_is_help=True,
)
rules_app.add_typer(compensation_app, name="compensation")


@compensation_app.command("list")
def compensation_list() -> None:
    """The unfinished compensation runs (rules versions, periods, start times) as JSON."""
    from loyalty.adapters.compensation_store import CompensationStore

    db = open_database(load_settings())
    try:
        echo_json(CompensationStore(db).unfinished_summary())
    finally:
        db.dispose()


@compensation_app.command("resume")
def compensation_resume(
    version: Annotated[int, typer.Argument(help="the run's new rules version")],
) -> None:
    """Finish the unfinished compensation run of VERSION (whatever rules were stored
    since); prints its receipt as JSON."""
    from loyalty.application.compensation import RunNotFound
    from loyalty.bootstrap import build_compensation
    from loyalty.domain.errors import PeriodNotRetained

    db = open_database(load_settings())
    try:
        receipt = build_compensation(db).resume(version)
    except RunNotFound as exc:
        raise fail(str(exc), 2) from None
    except PeriodNotRetained as exc:
        raise fail(f"{exc.message} (abandon the run instead)", 2) from None
    finally:
        db.dispose()
    echo_json(receipt)


@compensation_app.command("abandon")
def compensation_abandon(
    version: Annotated[int, typer.Argument(help="the run's new rules version")],
) -> None:
    """End the unfinished compensation run of VERSION without finishing it: members it
    already compensated keep their adjustment, the others get none. Prints the receipt
    (state abandoned, members compensated before) as JSON."""
    from loyalty.application.compensation import RunNotFound
    from loyalty.bootstrap import build_compensation

    db = open_database(load_settings())
    try:
        receipt = build_compensation(db).abandon(version)
    except RunNotFound as exc:
        raise fail(str(exc), 2) from None
    finally:
        db.dispose()
    echo_json(receipt)
