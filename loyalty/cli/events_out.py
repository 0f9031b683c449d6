"""Events out (issue 17): ``loyalty webhooks`` (subscriptions, dead letters, replay,
delivery) and ``loyalty relay`` (to RabbitMQ)."""

from __future__ import annotations

import signal
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loyalty.adapters.db import Database
from loyalty.application.delivery import WebhookAdmin
from loyalty.cli.common import (
    STARTUP_WAIT_SECONDS,
    configure_logging,
    fail,
    load_settings,
    open_database,
    utc_text,
)

webhooks_app = typer.Typer(
    help="Webhook subscriptions: create, list, delete, dead letters, replay, run.",
    no_args_is_help=True,
)


def _webhook_admin(db: Database) -> WebhookAdmin:
    from loyalty.application.accounts import Members
    from loyalty.bootstrap import build_webhook_admin

    def head() -> int:
        from loyalty.adapters.event_store import event_store_env

        members = Members(env=event_store_env(db.settings))
        try:
            return int(members.recorder.max_notification_id() or 0)
        finally:
            members.close()

    return build_webhook_admin(db, head)


@webhooks_app.command("create")
def webhooks_create(
    url: Annotated[str, typer.Option(help="http(s) URL the events are POSTed to")],
    event_type: Annotated[
        list[str] | None,
        typer.Option("--event-type", help="deliver only these types (repeat; default: all)"),
    ] = None,
) -> None:
    """Subscribe a URL; the signing secret is printed once, as the last line."""
    db = open_database(load_settings())
    try:
        created = _webhook_admin(db).create(url, event_type or ())
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    finally:
        db.dispose()
    typer.echo(f"created subscription {created.subscription_id} -> {created.url}")
    typer.echo("signing secret (Standard Webhooks; not shown again):")
    typer.echo(created.secret)


@webhooks_app.command("list")
def webhooks_list() -> None:
    """List subscriptions (never the secrets) with their cursors and dead letters."""
    from loyalty.adapters.delivery_store import SqlDeliveryStore

    db = open_database(load_settings())
    try:
        subscriptions = _webhook_admin(db).subscriptions()
        store = SqlDeliveryStore(db)
        cursors = store.cursors()
        letters = store.dead_letters()
    finally:
        db.dispose()
    table = Table("subscription_id", "url", "event_types", "position", "dead_letters")
    for s in subscriptions:
        table.add_row(
            s.subscription_id,
            s.url,
            ",".join(s.event_types) or "all",
            str(cursors.get(s.channel, 0)),
            str(sum(1 for d in letters if d.subscription_id == s.subscription_id)),
        )
    Console().print(table)


@webhooks_app.command("delete")
def webhooks_delete(
    subscription_id: Annotated[str, typer.Argument(help="the subscription to delete")],
) -> None:
    """Delete a subscription (its cursor and dead letters go with it)."""
    db = open_database(load_settings())
    try:
        deleted = _webhook_admin(db).delete(subscription_id)
    finally:
        db.dispose()
    if not deleted:
        raise fail("no such subscription", 1)
    typer.echo(f"deleted {subscription_id}")


@webhooks_app.command("dead-letters")
def webhooks_dead_letters(
    subscription: Annotated[
        str | None, typer.Option(help="only this subscription's dead letters")
    ] = None,
) -> None:
    """Deliveries that failed for the whole retry period."""
    db = open_database(load_settings())
    try:
        letters = _webhook_admin(db).dead_letters(subscription)
    finally:
        db.dispose()
    table = Table("subscription_id", "event_id", "type", "attempts", "failed_at", "last_error")
    for d in letters:
        table.add_row(
            d.subscription_id,
            d.event.id,
            d.event.type,
            str(d.attempts),
            utc_text(d.failed_at),
            d.last_error,
        )
    Console().print(table)
    typer.echo(f"{len(letters)} dead letters")


@webhooks_app.command("replay")
def webhooks_replay(
    subscription: Annotated[
        str | None, typer.Option(help="only this subscription's dead letters")
    ] = None,
) -> None:
    """Send every dead letter once more; delivered ones are deleted (exit 1 if any fail)."""
    from loyalty.bootstrap import webhook_sender

    settings = load_settings()
    db = open_database(settings)
    sender = webhook_sender(settings)
    try:
        delivered, failed = _webhook_admin(db).replay(sender, subscription)
    finally:
        sender.close()
        db.dispose()
    typer.echo(f"replayed: {delivered} delivered, {failed} still failing")
    if failed:
        raise typer.Exit(1)


@webhooks_app.command("run")
def webhooks_run() -> None:
    """Deliver webhooks in this process (while it holds the webhooks lease)."""
    from loyalty.bootstrap import build_webhook_dispatcher
    from loyalty.worker import WebhookRunner

    settings = load_settings()
    configure_logging(settings)
    db = open_database(settings, wait_seconds=STARTUP_WAIT_SECONDS, create=True)
    runner = WebhookRunner(db, build_webhook_dispatcher(db))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: runner.stop())
    runner.run()
    db.dispose()


def relay_cmd(
    amqp_url: Annotated[
        str,
        typer.Option(envvar="LOYALTY_AMQP_URL", help="the broker, amqp://user:pass@host:5672/"),
    ],
    exchange: Annotated[str, typer.Option(help="the durable topic exchange")] = "loyalty.events",
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="events per cursor move")] = 500,
) -> None:
    """Relay account events to RabbitMQ (routing key = event type, persistent, publisher
    confirms; the cursor moves only after the broker confirmed)."""
    from loyalty.bootstrap import build_relay
    from loyalty.worker import run_relay

    settings = load_settings()
    configure_logging(settings)
    db = open_database(settings, wait_seconds=STARTUP_WAIT_SECONDS, create=True)
    loop = build_relay(db, amqp_url, exchange=exchange, batch_size=batch)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: loop.stop())
    run_relay(db, loop)
    db.dispose()
