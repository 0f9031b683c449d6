"""``LOYALTY_DB_POOL_SIZE`` is each process's budget of PostgreSQL connections, all of
them: its SQLAlchemy pool, the event store's pool (one per process, however many
applications it builds), its lease session. Counted in ``pg_stat_activity`` per OS
process (client port -> the process holding the socket) while ``serve`` and its two
worker children take ingest batches, spends, adjustments and reads, the pipeline awards
and the read models project. PostgreSQL only (required under CI, as every PostgreSQL
test): SQLite opens no server connections."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.e2e.live import LOYALTY, create_key, env_for, serve_process

BUDGET = 4
"""Small on purpose: before the budget, each pool of each application could open twice
this (measured: a pipeline child held 18 connections at 3)."""


@pytest.fixture
def own_db(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """A database of its own, so that every connection to it is one of the processes'."""
    name = f"loyalty_budget_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    yield pg_admin_url.rsplit("/", 1)[0] + "/" + name, name
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        if m:
            found.add(m.group(1))
    return found


def _local_port_by_inode(server_port: int) -> dict[str, int]:
    """inode -> local port of every IPv4/IPv6 TCP socket connected to ``server_port``."""
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], parts[9]
            if int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports[inode] = int(local.rsplit(":", 1)[1], 16)
    return ports


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found + [g for c in found for g in _descendants(c)]


def _role(pid: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    if b"--no-pipeline" in cmdline:
        return "read-model"
    if b"worker" in cmdline:
        return "pipeline"
    return "serve"


def connections_per_process(
    admin_url: str, dbname: str, root: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(connections per process role, connections per application_name) to ``dbname``."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT client_port, application_name FROM pg_stat_activity WHERE datname = %s",
            (dbname,),
        ).fetchall()
    ports = {r[0] for r in rows}
    names: dict[str, int] = {}
    for _port, name in rows:
        names[name] = names.get(name, 0) + 1
    by_inode = _local_port_by_inode(5432)
    counts: dict[str, int] = {}
    for pid in [root, *_descendants(root)]:
        try:
            role = _role(pid)
        except OSError:
            continue
        mine = {by_inode[i] for i in _socket_inodes(pid) if i in by_inode} & ports
        counts[role] = counts.get(role, 0) + len(mine)
    return counts, names


def test_each_process_stays_within_its_connection_budget_under_load(
    own_db: tuple[str, str], pg_admin_url: str
) -> None:
    url, dbname = own_db
    assert subprocess.run([*LOYALTY, "migrate"], env=env_for(url), timeout=120).returncode == 0
    ops = {"Authorization": "Bearer " + create_key(url, "operator", "ops")}
    ing = {"Authorization": "Bearer " + create_key(url, "ingest", "games")}
    shop = {"Authorization": "Bearer " + create_key(url, "shop", "web")}
    peak: dict[str, int] = {}
    names_seen: dict[str, int] = {}
    failures: list[str] = []
    with serve_process(
        url,
        stop_timeout=30,
        LOYALTY_DB_POOL_SIZE=str(BUDGET),
        LOYALTY_AWARD_WINDOW_SECONDS="0.2",
    ) as server:
        base, proc, output = server.base, server.proc, server.output
        stop = time.monotonic() + 15

        def load(i: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as h:
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    now = datetime.now(UTC).isoformat()
                    batch = [
                        {
                            "event_id": f"{i}-{n}-{k}",
                            "user_id": f"u{i}-{k % 7}",
                            "type": "logged_on",
                            "occurred_at": now,
                        }
                        for k in range(50)
                    ]
                    answers = [
                        h.post("/v1/ingress/batches", headers=ing, json={"events": batch}),
                        h.post(
                            f"/v1/members/m{i}/adjustments",
                            headers=ops,
                            json={
                                "adjustment_id": f"a{n}",
                                "currency": 5,
                                "rank_points": 1,
                                "reason": "load",
                            },
                        ),
                        h.post(
                            f"/v1/members/m{i}/spend",
                            headers=shop,
                            json={"order_id": f"o{n}", "amount": 1},
                        ),
                        h.get(f"/v1/members/m{i}", headers=shop),
                        h.get(f"/v1/members/m{i}/history", headers=shop),
                    ]
                    failures.extend(
                        f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:200]}"
                        for r in answers
                        if r.status_code >= 500
                    )

        threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            counts, names = connections_per_process(pg_admin_url, dbname, proc.pid)
            for role, count in counts.items():
                peak[role] = max(peak.get(role, 0), count)
            for name, count in names.items():
                names_seen[name] = max(names_seen.get(name, 0), count)
            time.sleep(0.3)
        for t in threads:
            t.join()

        # the pipeline and the read models worked under the budget
        deadline = time.monotonic() + 60
        while True:
            status = httpx.get(f"{base}/v1/pipeline", headers=ops, timeout=30).json()
            history = httpx.get(f"{base}/v1/members/m0/history", headers=shop, timeout=30)
            if status["pending"] == 0 and status["awards_total"] > 0 and history.json():
                break
            assert time.monotonic() < deadline, (status, history.text[:300], output()[-3000:])
            time.sleep(0.5)
    print(f"LOYALTY_DB_POOL_SIZE={BUDGET}: peak per process {peak}, per name {names_seen}")
    assert set(peak) == {"serve", "pipeline", "read-model"}, peak
    assert all(count >= 1 for count in peak.values()), peak
    assert all(count <= BUDGET for count in peak.values()), (peak, output()[-3000:])
    # every connection says whose it is
    assert set(names_seen) <= {"loyalty", "loyalty-pipeline", "loyalty-read-model"}, names_seen
    assert not failures, failures[:5]


def test_every_event_store_application_of_a_process_shares_one_bounded_pool(
    pg_url: str,
) -> None:
    """Three applications (the pipeline's, the expiry's, the feed's in a worker) open no
    more than the event store's share of the budget, together, and wait for a free
    connection rather than open another."""
    from loyalty.adapters.event_store import event_store_env, worker_env
    from loyalty.application.accounts import Members
    from loyalty.config import Settings

    settings = Settings(database_url=pg_url, db_pool_size=5, db_application_name="budget-t")
    store = 2  # the event store's share: 2/5 of 5
    apps = [
        Members(env=worker_env(settings)),
        Members(env=worker_env(settings)),
        Members(env=event_store_env(settings)),
    ]
    try:
        pools = {id(app.recorder.datastore.pool) for app in apps}  # type: ignore[attr-defined]
        assert len(pools) == 1
        held = []
        for app in apps:
            for _ in range(store):
                if len(held) == store:
                    break
                cm = app.recorder.datastore.get_connection()  # type: ignore[attr-defined]
                held.append((cm, cm.__enter__()))
        with psycopg.connect(pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            count = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'budget-t'"
            ).fetchone()
        assert count is not None and count[0] == store
        for cm, _conn in held:
            cm.__exit__(None, None, None)
    finally:
        for app in apps:
            app.close()


def test_the_event_store_waits_for_a_database_that_comes_late(pg_admin_url: str) -> None:
    """At start the event store's pool waits for the database like ``serve`` and
    ``worker`` do (it gave up after 5 s: "couldn't get a connection after 5.00 sec")."""
    from loyalty.adapters.event_store import event_store_env
    from loyalty.application.accounts import Members
    from loyalty.config import Settings

    name = f"loyalty_late_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = pg_admin_url.rsplit("/", 1)[0] + "/" + name

    def create_later() -> None:
        time.sleep(7)
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]

    creator = threading.Thread(target=create_later)
    creator.start()
    started = time.monotonic()
    try:
        app = Members(env=event_store_env(Settings(database_url=url)))
        try:
            with app.recorder.datastore.transaction() as curs:  # type: ignore[attr-defined]
                curs.execute("SELECT 1 AS one")
                assert curs.fetchone() == {"one": 1}
        finally:
            app.close()
    finally:
        creator.join()
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
    assert time.monotonic() - started >= 7


def test_the_lease_objects_of_a_process_share_one_session_and_exclude_each_other(
    pg_url: str,
) -> None:
    """Every lease of a process rides one connection (it held one per lease object: four
    or five idle connections of a worker's budget), and two lease objects of one process
    still exclude each other although advisory locks are re-entrant within a session."""
    from loyalty.adapters.db import Database
    from loyalty.adapters.pipeline_store import ShardLeases
    from loyalty.config import Settings

    db = Database(Settings(database_url=pg_url, db_application_name="budget-leases"))
    first, second, third = ShardLeases(db), ShardLeases(db), ShardLeases(db)
    try:
        assert first.try_acquire(900_001)
        assert second.try_acquire(900_002)
        assert third.try_acquire(900_003)
        assert not second.try_acquire(900_001)  # first holds it, in the same session
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND objid IN (900001, 900002, 900003)"
            ).fetchone()
        assert row is not None and row[0] == 1
        first.release_all()  # unlocks its key only: the others keep theirs
        assert second.held() == {900_002} and third.held() == {900_003}
        assert second.try_acquire(900_001)
        assert second.held() == {900_001, 900_002}
        with psycopg.connect(pg_url, autocommit=True) as conn:  # the session ends
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'budget-leases'"
            )
        assert second.held() == set() and third.held() == set()
        assert third.try_acquire(900_001)  # taken anew on a new session
    finally:
        for leases in (first, second, third):
            leases.release_all()
        db.dispose()
