"""Shared fixtures: real SQLite files and a real PostgreSQL database per session.

PostgreSQL tests run when a server answers on LOYALTY_TEST_PG (default
postgresql://postgres@127.0.0.1:5432/postgres); with CI set, a missing server fails the
run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.migrate import migrate
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.config import Settings

PG_ADMIN_URL = os.environ.get("LOYALTY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgresql"]


def backends(*names: str) -> pytest.MarkDecorator:
    """Runs a test on ``names`` only: its ``settings`` (and so ``db``) parametrized for
    them, where a test for one backend used to skip on the other (the skip list, -ra,
    then shows only real skips)."""
    assert names and set(names) <= set(BACKENDS), names
    return pytest.mark.parametrize("settings", names, indirect=True)


def required_tool(name: str, *paths: str) -> str:
    """The path of an external program a test needs (on PATH or at one of ``paths``):
    the test skips where it is missing, and with CI set fails (.ci/run installs it),
    like PostgreSQL, RabbitMQ and Chromium."""
    found = shutil.which(name) or next(
        (p for p in paths if Path(p).is_file() and os.access(p, os.X_OK)), None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI and not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: xdist's worker (--dist loadgroup) turns each xdist_group marker into the
    # node id's @group suffix in its own hook, which otherwise runs before this one (a
    # conftest registers first, and pluggy calls the last registered first): the serial
    # and cpu-bound groups were never applied, and their tests ran side by side.
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "domain"):
            item.add_marker(pytest.mark.unit)
        elif tier in ("integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))
        if "slow" not in item.keywords and starts_processes(item):
            item.add_marker(pytest.mark.slow)
        if "serial" in item.keywords:
            item.add_marker(pytest.mark.xdist_group(SERIAL))
        elif Path(str(item.fspath)).name in CPU_BOUND:
            item.add_marker(pytest.mark.xdist_group("cpu-bound"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under ``--dist loadgroup`` each xdist worker must have turned the test's group into
    a node id suffix (``...@serial``), which is what its scheduler reads; when it has
    not, the groups are silently ignored (pytest 9.2 derives node ids anew, so xdist
    3.8's suffix is lost; before that, this file's hook ran after xdist's): the test fails
    instead of running beside the tests its group keeps it from."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and item.config.getoption("loadgroup", False)):
        return
    if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rsplit("]", 1)[-1]:
        pytest.fail(
            "xdist groups not applied: this pytest / pytest-xdist pair ignores xdist_group "
            "(see pyproject.toml), so serial tests would run side by side"
        )


COLLECTED_ON = datetime.now(UTC).date()
"""The day this process imported the test modules (their ``NOW``)."""
MIDNIGHT_MARGIN = timedelta(seconds=300)
"""How long before midnight UTC a test does not start: pytest-timeout's limit
(pyproject.toml), so no test runs across midnight."""


@pytest.fixture(autouse=True)
def _clear_of_midnight() -> None:
    """Keep every test on one UTC day, and on the day its module's ``NOW`` says.

    Many modules fix ``NOW`` (and ``TODAY``) when they are imported, at collection, and
    compare what they store "now" with what the service works out from its own clock
    (today's report row, this month's pending earnings, the open partition). A run
    that crossed midnight failed 16 of them (a 30-day report missing today's row, rollups
    on the wrong day). A test does not start in the last ``MIDNIGHT_MARGIN`` before
    midnight (it waits for the new day), and after a day has turned, every loaded test
    module's ``NOW``/``TODAY`` taken on the day of collection moves to the new day (the
    current time, its microseconds as the module had them; fixed dates stay)."""
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    if midnight - now < MIDNIGHT_MARGIN:
        time.sleep((midnight - now).total_seconds() + 1)
        now = datetime.now(UTC)
    if now.date() == COLLECTED_ON:  # the common case: nothing to move
        return
    for name, module in list(sys.modules.items()):
        if not name.startswith("tests."):
            continue
        stamp = getattr(module, "NOW", None)
        if isinstance(stamp, datetime) and stamp.date() == COLLECTED_ON:
            module.NOW = now.replace(microsecond=stamp.microsecond)  # type: ignore[attr-defined]
            if isinstance(getattr(module, "TODAY", None), date):
                module.TODAY = now.date()  # type: ignore[attr-defined]


def earlier_today(now: datetime, before: timedelta) -> datetime:
    """``now - before``, but not before ``now``'s midnight: traffic a test counts as
    today's stays today's when the suite runs just after midnight (seen: a console test
    stamping 30 events a minute apart counted 10 of them at 00:10)."""
    return max(now - before, datetime.combine(now.date(), datetime.min.time(), now.tzinfo))


SERIAL = "serial"
"""The xdist group (``make test`` runs ``-n 4 --dist loadgroup``) whose tests run one
after another on one worker: those marked ``serial`` (they measure time). Every other
test shares nothing with its neighbours: each xdist worker has its own PostgreSQL
database (``pg_url``), temporary directories and free ports; tests that stop a server
stop one of their own (tests/e2e/pgcluster.py, tests/e2e/rabbitnode.py), and tests on
the machine's RabbitMQ use exchanges and queues of their own."""


CPU_BOUND = {"test_compensation_crash.py", "test_compensation_versions.py"}
"""Modules whose tests keep a core busy (compensations over hundreds of members run by
the CLI; 1,500 in the erasure test): one xdist group, so that they run one at a time
beside the other workers' tests, which mostly wait on their processes, instead of three
at once on 2 cores (seen: three `rules apply --compensate` at once, each past its
120 s)."""


def worker_id() -> str:
    """This pytest process's xdist worker ("gw0", ...), "main" without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


# What starts another process: the subprocess module (the CLI, `loyalty serve`, workers,
# initdb, nginx, rabbitmqctl, ...) and Playwright (a browser).
_PROCESS_STARTERS = {"subprocess", "playwright.sync_api"}


def starts_processes(item: pytest.Item) -> bool:
    """Whether a test starts other processes (a live server, the CLI, a worker, a
    cluster, a browser): the code of the test, of its fixtures and of every function or
    class of tests/ they use, followed name by name. Such tests are marked ``slow``, so
    ``make test-fast`` (-m "not slow") leaves them out without anyone marking them."""
    roots: list[object] = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        roots += [d.func for defs in info.name2fixturedefs.values() for d in defs]
    seen: set[int] = set()
    return any(_reaches_processes(root, seen) for root in roots)


def _reaches_processes(obj: object, seen: set[int]) -> bool:
    import inspect
    import types

    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, types.ModuleType):
        return obj.__name__ in _PROCESS_STARTERS
    if getattr(obj, "__module__", None) in _PROCESS_STARTERS:
        return True  # e.g. subprocess.Popen, sync_playwright imported by name
    obj = inspect.unwrap(obj) if callable(obj) else obj  # type: ignore[arg-type]
    module = getattr(obj, "__module__", None) or ""
    if not module.startswith("tests"):
        return False  # the code under test and libraries: not followed
    if isinstance(obj, type):
        return any(_reaches_processes(v, seen) for v in vars(obj).values())
    if isinstance(obj, (staticmethod, classmethod, property)):
        return _reaches_processes(obj.__func__ if not isinstance(obj, property) else obj.fget, seen)
    code = getattr(obj, "__code__", None)
    if code is None:
        return False
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    if names & _PROCESS_STARTERS:
        return True  # `import subprocess` inside the function
    # names of the module's globals, and of tests modules imported inside the function
    # (`from tests.e2e.live import cli`)
    scopes = [getattr(obj, "__globals__", {})]
    scopes += [vars(sys.modules[n]) for n in names if n.startswith("tests") and n in sys.modules]
    return any(
        name in scope and _reaches_processes(scope[name], seen)
        for scope in scopes
        for name in names
    )


class Clock:
    """A settable clock for tests (``now`` defaults to the real time at creation)."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI and unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    return PG_ADMIN_URL


def _admin(sql: str, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def _drop_orphans(url: str) -> None:
    """Drops the session databases (named as below) of test processes of this machine
    that are gone: a run stopped by ^C or a timeout never reaches its own DROP."""
    import re

    with psycopg.connect(url, autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database")]
        for name in names:
            found = re.fullmatch(r"loyalty_test_(?:gw\d+|main)_(\d+)_[0-9a-f]{8}", name)
            if found and not Path(f"/proc/{found.group(1)}").exists():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database for this test session (each xdist worker is a session of its
    own), migrated once, dropped at the end."""
    _drop_orphans(pg_admin_url)
    name = f"loyalty_test_{worker_id()}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"', pg_admin_url)
    url = pg_admin_url.rsplit("/", 1)[0] + "/" + name
    db = Database(Settings(database_url=url))
    migrate(db)
    db.dispose()
    yield url
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', pg_admin_url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies (copying beats migrating)."""
    path = tmp_path_factory.mktemp("template") / "loyalty.db"
    db = Database(Settings(database_url=f"sqlite:///{path}"))
    migrate(db)
    with db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.dispose()
    return path


def truncate_all(url: str) -> None:
    """Empty every table of ours (partitions stay: each test picks its own days)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
                "AND c.relname <> 'alembic_version'"
            )
        ]
        if tables:
            conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY")


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for a migrated, empty database on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "loyalty.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return Settings(database_url=f"sqlite:///{path}")
    url = request.getfixturevalue("pg_url")
    truncate_all(url)
    return Settings(database_url=url)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings)
    yield database
    database.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(settings: Settings, db: Database, clock: Clock) -> Iterator[TestClient]:
    with TestClient(create_app(settings, db=db, clock=clock)) as test_client:
        yield test_client


@pytest.fixture
def make_key(db: Database) -> Callable[..., dict[str, str]]:
    """make_key(role, name) -> Authorization headers for a new key."""
    store = KeyStore(db)

    def make(role: str = "ingest", name: str = "gamesite") -> dict[str, str]:
        return {"Authorization": f"Bearer {store.create(Role(role), name)}"}

    return make


def migrate_to(db: Database, revision: str, *, down: bool) -> None:
    """Take ``db``'s schema up or down to ``revision`` with Alembic (a migration's test:
    data written at an older revision, then migrated)."""
    from alembic import command

    from loyalty.adapters.migrate import alembic_config, locked_connection

    cfg = alembic_config()
    with locked_connection(db) as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
        conn.commit()


def drain_pipeline(db: Database, members: object | None = None, timeout: float = 30.0) -> int:
    """Run the pipeline until nothing is pending. On PostgreSQL a writing transaction
    of another session (any database on the server) briefly hides newer rows from the
    gap-safe reader, so one pass may not see everything: keep going until none is left."""

    from loyalty.bootstrap import build_pipeline

    return drain_with(build_pipeline(db, members), db, timeout)  # type: ignore[arg-type]


def drain_with(
    pipeline: object, db: Database, timeout: float = 30.0, *, record: bool = True
) -> int:
    """Run ``pipeline`` until nothing is pending (see drain_pipeline), then (``record``)
    record every member's pending earnings on the account, whatever the interval."""
    import time

    deadline = time.monotonic() + timeout
    total = 0
    while True:
        total += pipeline.drain(range(db.settings.shard_count))  # type: ignore[attr-defined]
        if nothing_pending(db):
            if record:
                pipeline.record_all(range(db.settings.shard_count))  # type: ignore[attr-defined]
            return total
        if time.monotonic() > deadline:
            raise AssertionError("pipeline did not drain")
        time.sleep(0.05)


def wait_visible(db: Database, timeout: float = 30.0) -> None:
    """Waits until the pipeline's reader can see every ingress row stored so far. On
    PostgreSQL it reads only rows of transactions older than every transaction still in
    flight anywhere on the server (``pg_snapshot_xmin``; ``adapters/ingress_log.py``): a
    write of another test session (another xdist worker, another database of the same
    server) still open hides rows committed after it began. A test that ingests and then
    processes a shard once calls this between the two; SQLite: nothing to wait for."""
    if db.backend != "postgresql":
        return
    import sqlalchemy as sa

    deadline = time.monotonic() + timeout
    with db.read() as conn:
        newest = conn.execute(sa.text("SELECT coalesce(max(txid), 0) FROM ingress_events"))
        last = int(newest.scalar_one())
    while True:
        with db.read() as conn:
            horizon = conn.execute(
                sa.text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            ).scalar_one()
        if int(horizon) > last:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"ingress rows up to txid {last} still invisible after {timeout} s")
        time.sleep(0.01)


def nothing_pending(db: Database) -> bool:
    """Whether the pipeline has processed every stored event: a pass that processed
    nothing does not say so on PostgreSQL (see drain_pipeline; more likely when other
    xdist workers write to the same server)."""
    from loyalty.adapters.pipeline_store import PipelineStore
    from loyalty.bootstrap import backlog_of

    positions = PipelineStore(db).positions()
    return backlog_of(db)(positions)[0] == 0


AMQP_URL = os.environ.get("LOYALTY_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The machine's RabbitMQ (LOYALTY_TEST_AMQP overrides): relay tests skip without
    it locally and fail without it in CI, like PostgreSQL."""
    import pika
    import pika.exceptions

    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except pika.exceptions.AMQPError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ is required in CI and unreachable: {exc!r}")
        pytest.skip(f"RabbitMQ unreachable: {exc!r}")
    return AMQP_URL


class NatsServer:
    """A private ``nats-server -js`` on its own port and store directory (never the
    machine's own on 4222): tests kill -9 and restart it."""

    def __init__(self, binary: str, store: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.binary, self.store = binary, store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: object = None
        self.start()

    def start(self) -> None:
        import socket
        import subprocess

        self.proc = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nats-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """kill -9, and wait for it to be gone."""
        import subprocess

        proc = self.proc
        assert isinstance(proc, subprocess.Popen)
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private JetStream server for one test; with CI set a missing nats-server fails
    (``.ci/run`` starts one and the binary comes with it), like PostgreSQL."""
    binary = required_tool("nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server")
    from loyalty.adapters.nats_log import close_client

    server = NatsServer(binary, tmp_path / "nats-store")
    yield server
    close_client(server.url)
    server.kill()


def on_jetstream(settings: Settings, server: NatsServer, **extra: object) -> Settings:
    """``settings`` with the ingress log on ``server``'s JetStream (a stream of its own)."""
    return settings.model_copy(
        update={
            "ingress_url": server.url,
            "ingress_stream": f"T{uuid.uuid4().hex[:12]}",
            **extra,
        }
    )
