"""The ``loyalty`` command line: the app assembled from its command groups (one module
each; what they share is in :mod:`loyalty.cli.common`). Help lists the commands in the
order they are added here."""

from __future__ import annotations

import typer

from loyalty.cli import (
    diagnostics,
    events_out,
    expiry,
    keys,
    members,
    projections,
    reporting,
    retention,
    rules,
    serving,
    simulate,
)
from loyalty.cli.common import options
from loyalty.cli.help_text import tidy_app

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.callback()(options)

app.command("migrate")(serving.migrate_cmd)
app.command("serve")(serving.serve)
app.command("worker")(serving.worker_cmd)
app.command("doctor")(diagnostics.doctor_cmd)
app.command("forget")(members.forget_cmd)
app.command("simulate")(simulate.simulate)
app.command("storage")(diagnostics.storage_cmd)
app.command("relay")(events_out.relay_cmd)
app.command("report")(reporting.report)
app.command("export")(reporting.export_cmd)

app.add_typer(keys.keys_app, name="keys")
app.add_typer(projections.projections_app, name="projections")
app.add_typer(rules.rules_app, name="rules")
app.add_typer(retention.retention_app, name="retention")
app.add_typer(events_out.webhooks_app, name="webhooks")
app.add_typer(expiry.expiry_app, name="expiry")

tidy_app(app)


def main() -> None:
    app(prog_name="loyalty")
