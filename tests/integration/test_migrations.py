"""The migrations where the project brief puts them: ``alembic.ini`` + ``alembic/`` at the
repository root, usable with the ``alembic`` command (the URL from our Settings), and
the very same scripts run by ``loyalty migrate`` from a checkout, a wheel and the image
(tests/e2e/test_packaging.py builds the wheel)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import create_day_partition, partition_name
from loyalty.adapters.migrate import (
    CHECKOUT,
    head_revision,
    include_object,
    migrate,
    newest_script,
    script_location,
    target_metadata,
    up_to_date,
)
from loyalty.config import Settings
from tests.e2e.live import env_for

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = str(Path(sys.executable).with_name("alembic"))


def alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ALEMBIC, *args], cwd=ROOT, env=env_for(url), capture_output=True, text=True, timeout=120
    )


def test_the_checkout_runs_the_top_level_scripts() -> None:
    assert script_location() == CHECKOUT == ROOT / "alembic"
    assert (ROOT / "alembic.ini").is_file()
    assert not (ROOT / "loyalty" / "migrations").exists(), "one copy of the scripts"
    # alembic/ is not a package: it cannot shadow the alembic library on sys.path
    assert not (ROOT / "alembic" / "__init__.py").exists()
    found = subprocess.run(
        [sys.executable, "-c", "import alembic, alembic.command; print(alembic.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "site-packages" in found.stdout, found.stdout


def test_alembic_command_from_the_root_with_the_url_from_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/loyalty.db"
    upgraded = alembic(url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    current = alembic(url, "current")
    assert current.returncode == 0 and f"{head_revision()} (head)" in current.stdout
    history = alembic(url, "history")
    revisions = {
        line.split(",")[0].split(" -> ")[-1].split()[0]
        for line in history.stdout.split("\n")
        if " -> " in line
    }
    assert {"0001", head_revision()} <= revisions, history.stdout
    with sqlite3.connect(tmp_path / "loyalty.db") as conn:
        # the file was prepared like `loyalty migrate` does (through the same lock)
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"ingress_events", "member_balances", "forget_requests"} <= tables
    # autogenerate is refused on SQLite (hand-written statements), and writes nothing
    before = sorted((ROOT / "alembic" / "versions").iterdir())
    refused = alembic(url, "revision", "--autogenerate", "-m", "probe")
    assert refused.returncode != 0 and "PostgreSQL" in refused.stderr
    assert sorted((ROOT / "alembic" / "versions").iterdir()) == before


@pytest.fixture
def pg_db(pg_url: str) -> Database:
    db = Database(Settings(database_url=pg_url))
    yield db  # type: ignore[misc]
    db.dispose()


def test_autogenerate_on_an_up_to_date_database_proposes_nothing(pg_db: Database) -> None:
    """What ``alembic revision --autogenerate`` compares: our metadata against a database
    that ``loyalty migrate`` brought to head, with the event store's tables and an
    ingress day partition present. The filter keeps those out; nothing else differs."""
    day = (datetime.now(UTC) + timedelta(days=3)).date()
    create_day_partition(pg_db, day)
    with pg_db.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"members_events", partition_name(day)} <= tables
        compared = MigrationContext.configure(conn, opts={"include_object": include_object})
        assert compare_metadata(compared, target_metadata()) == []
        unfiltered = MigrationContext.configure(conn)
        dropped = {
            diff[1].name
            for diff in compare_metadata(unfiltered, target_metadata())
            if isinstance(diff, tuple) and diff[0] == "remove_table"
        }
    assert {"members_events", partition_name(day)} <= dropped, "the filter matters"


def test_a_current_schema_is_seen_with_one_read_and_anything_else_migrates(
    tmp_path: Path,
) -> None:
    """Every CLI command and worker process migrates at its start: a current schema is
    left as it is after one read, without loading Alembic (a third of a command's start);
    a database at another revision, or without the event store's tables, goes through
    Alembic as before."""
    assert newest_script() == head_revision()  # the file names give the head
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    db = Database(Settings(database_url=url))
    try:
        assert not up_to_date(db)  # a new file: no alembic_version
        assert not (tmp_path / "fresh.db").exists()  # and the question did not create it
        assert migrate(db) == head_revision()
        assert up_to_date(db)
        with sqlite3.connect(tmp_path / "fresh.db") as conn:  # chosen before any table
            assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental
        with db.write() as conn:
            conn.execute(sa.text("DROP TABLE stored_snapshots"))
        assert not up_to_date(db)
        migrate(db)  # the event store's tables are created again
        assert up_to_date(db)
        with db.write() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0020_nats'"))
        assert not up_to_date(db)
        with db.write() as conn:
            conn.execute(
                sa.text("UPDATE alembic_version SET version_num = :v"), {"v": head_revision()}
            )
    finally:
        db.dispose()
    probe = (
        "import sys; from loyalty.adapters.db import Database; "
        "from loyalty.adapters.migrate import migrate; from loyalty.config import Settings; "
        f"db = Database(Settings(database_url={url!r})); migrate(db); "
        "print('alembic' in sys.modules)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "False"
