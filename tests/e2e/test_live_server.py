"""The real CLI and server as processes: fresh databases, parallel clients."""

from __future__ import annotations

import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.config import Settings
from tests.e2e.live import LOYALTY, create_key, env_for, serve


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The URL of a brand-new, never-migrated database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sub' / 'fresh.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    name = f"loyalty_fresh_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_two_processes_migrating_a_fresh_database_at_once(fresh_url: str) -> None:
    """Three one-shot commands allowed to create the database (--create) race to make
    and migrate it: all succeed, each with its own key."""
    procs = [
        subprocess.Popen(
            [*LOYALTY, "--create", "keys", "create", "--role", "ingest", "--name", f"s{i}"],
            env=env_for(fresh_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    keys = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert all(k.startswith("lk_") for k in keys) and len(set(keys)) == 3


def test_serve_migrates_a_fresh_database_and_ingests(fresh_url: str) -> None:
    with serve(fresh_url) as base:
        key = create_key(fresh_url, "ingest", "gamesite")
        assert httpx.get(base + "/readyz").json() == {"status": "ready"}
        now = datetime.now(UTC).isoformat()
        resp = httpx.post(
            base + "/v1/ingress/batches",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "events": [
                    {"event_id": "e1", "user_id": "u1", "type": "logged_on", "occurred_at": now}
                ]
            },
        )
        assert resp.status_code == 202 and resp.json()["accepted"] == 1


def test_concurrent_batches_from_two_sources_with_overlapping_ids(settings: Settings) -> None:
    """Two sources send the same event ids in parallel, each batch twice: dedup is per
    source, nothing is lost or stored twice."""
    url = settings.database_url
    keys = {src: create_key(url, "ingest", src) for src in ("games", "shop")}
    now = datetime.now(UTC).isoformat()

    def batch(n: int) -> dict[str, object]:
        return {
            "events": [
                {
                    "event_id": f"b{n}-e{i}",
                    "user_id": f"u{i % 37}",
                    "type": "played_game",
                    "occurred_at": now,
                }
                for i in range(200)
            ]
        }

    with serve(url) as base:

        def post(job: tuple[str, int]) -> dict[str, int]:
            src, n = job
            with httpx.Client(base_url=base, timeout=60) as http:
                r = http.post(
                    "/v1/ingress/batches",
                    json=batch(n),
                    headers={"Authorization": f"Bearer {keys[src]}"},
                )
                assert r.status_code == 202, r.text
                return r.json()  # type: ignore[no-any-return]

        jobs = [(src, n) for n in range(10) for src in keys for _ in range(2)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, jobs))

    assert sum(r["accepted"] for r in results) == 2 * 10 * 200
    assert sum(r["duplicates"] for r in results) == 2 * 10 * 200
    db = Database(settings)
    with db.read() as conn:
        per_source = dict(
            conn.execute(
                sa.text(
                    "SELECT source, count(DISTINCT event_id) FROM ingress_events GROUP BY source"
                )
            ).all()
        )
        total = conn.execute(sa.text("SELECT count(*) FROM ingress_events")).scalar_one()
    db.dispose()
    assert per_source == {"games": 2000, "shop": 2000}
    assert total == 4000
