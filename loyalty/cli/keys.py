"""``loyalty keys``: create, list and revoke API keys."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loyalty.adapters.keys import KeyStore
from loyalty.application.access import Role
from loyalty.cli.common import err, fail, load_settings, open_database, utc_text

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    role: Annotated[Role, typer.Option(help="what the key may do")],
    name: Annotated[str, typer.Option(help="who holds it; for ingest keys, the event source")],
) -> None:
    """Create a key; it is printed once, as the last line, and stored only as a hash."""
    db = open_database(load_settings())
    try:
        store = KeyStore(db)
        namesakes = store.namesakes(name)
        key = store.create(role, name)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    finally:
        db.dispose()
    if namesakes:
        ids = ", ".join(f"{k.key_id} ({k.role.value})" for k in namesakes)
        err.print(
            f"warning: another active key is named {name}: {ids}; if this one replaces it, "
            "revoke the old one (loyalty keys revoke KEY_ID) once the new one is in use",
            soft_wrap=True,
            highlight=False,
        )
    typer.echo(f"created {role.value} key for {name}; keep it secret, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (ids, names, roles; never the secrets)."""
    db = open_database(load_settings())
    rows = KeyStore(db).list()
    db.dispose()
    table = Table(box=None, pad_edge=False)
    table.add_column("key_id", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("role", no_wrap=True)
    table.add_column("created_at", no_wrap=True)  # whole, whatever the width
    table.add_column("revoked_at", no_wrap=True)
    for k in rows:
        table.add_row(
            k.key_id,
            k.name,
            k.role.value,
            utc_text(k.created_at.replace(microsecond=0)),
            utc_text(k.revoked_at.replace(microsecond=0)) if k.revoked_at else "",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key id (or the full key)")],
) -> None:
    """Revoke a key; other processes stop accepting it within the auth cache time."""
    db = open_database(load_settings())
    revoked = KeyStore(db).revoke(key_id)
    db.dispose()
    if not revoked:
        raise fail("no active key with that id", 1)
    typer.echo(f"revoked {key_id}")
