"""Issue 31, part 1: many processes on one PostgreSQL, proven with real processes.

The same seeded stream goes through one ``loyalty serve`` and through 3 ``serve
--no-worker`` behind the shipped nginx config plus 3 ``loyalty worker`` (every shard each),
one of which is ``kill -9``'d and restarted every ~3 s (the one holding the shards). Then:
the balances are identical and every member is readable; after each kill every shard is
leased again within a bound; every background job's lease is held by one worker at a
time and never by an API process; no process holds more than ``LOYALTY_DB_POOL_SIZE``
connections, the six together at most 6 x it (docs/deployment.md).

PostgreSQL only, required under CI like every PostgreSQL test (and nginx, as
tests/e2e/test_nginx_config.py). ``SCALE_OUT_EVENTS`` / ``SCALE_OUT_MEMBERS`` change the
size (the issue's run: 60000 / 300)."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

from loyalty.adapters.lease_keys import JOB_LEASES
from tests.conftest import required_tool
from tests.e2e.scale_out import (
    Cluster,
    Keys,
    balances,
    cluster,
    connections,
    drained,
    ingest,
    leases,
    own_database,
    seeded_events,
    single_serve,
)

pytestmark = pytest.mark.slow

EVENTS = int(os.environ.get("SCALE_OUT_EVENTS", "12000"))
MEMBERS = int(os.environ.get("SCALE_OUT_MEMBERS", "300"))
SHARDS = 16
BUDGET = 10  # LOYALTY_DB_POOL_SIZE's default
APIS, WORKERS = 3, 3
KILL_EVERY = 3.0
KILLS = 4
RELEASE_TYPICAL, RELEASE_BOUND = 3.0, 10.0
"""Seconds from a kill -9 until every shard is leased again by the live workers: one
asks for free shards between two passes over its own, so within a second when it is
idle (0.5-1.5 s measured) and after its current pass when it is busy. The median must
be typical, every one within the bound."""
JOBS_HELD = ("projection", "forget", "webhooks")  # held while the process runs
RUN_LINES = ("retention as of",)  # logged by each run (every second here); expiry logs
# a run only when the rules expire currency (not the default): its lease is sampled only
EXTRA = {"LOYALTY_RETENTION_INTERVAL_SECONDS": "1", "LOYALTY_EXPIRY_INTERVAL_SECONDS": "1"}


SPLIT = ("pending_currency", "pending_rank_points")
"""How much of a balance is recorded and how much still pending depends on where the
windows fell (the award interval is an hour): the balances themselves may not."""


def account(body: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in body.items() if k not in SPLIT}


class Watch:
    """Samples the database every 0.1 s: connections and leases per application_name."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self._admin, self._db = admin_url, dbname
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self.samples: list[tuple[float, dict[int, list[str]]]] = []
        self.stop = threading.Event()
        self.missed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._sample()
            except psycopg.OperationalError:  # the server full of the other tests' clients
                self.missed += 1
            self.stop.wait(0.1)

    def _sample(self) -> None:
        conns = connections(self._admin, self._db)
        for name, n in conns.items():
            self.peak[name] = max(self.peak.get(name, 0), n)
        self.peak_total = max(self.peak_total, sum(conns.values()))
        self.samples.append((time.monotonic(), leases(self._admin, self._db)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def activity(admin_url: str, dbname: str) -> list[tuple[object, ...]]:
    """What every connection to ``dbname`` is doing (diagnostics of a slow re-lease)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT application_name, state, wait_event_type, wait_event, "
            "round(extract(epoch FROM now() - query_start)::numeric, 1), left(query, 80) "
            "FROM pg_stat_activity WHERE datname = %s ORDER BY 1",
            (dbname,),
        ).fetchall()


def kill_loop(c: Cluster, admin_url: str, dbname: str, stop: threading.Event) -> list[float]:
    """Every KILL_EVERY s: kill -9 the worker holding the most shards, start it again at
    once, and time until all shards are leased again; at least KILLS times, then until
    ``stop``. Returns those times."""
    taken: list[float] = []
    while not stop.wait(KILL_EVERY) or len(taken) < KILLS:
        # every worker in its loop first: a kill then tests the takeover by a live
        # worker, not a cold start (under load a restart took longer than 3 s, and
        # killing on would leave no worker up at all: 22.5 s without one)
        up_by = time.monotonic() + 120
        while not all("worker for shards" in w.output() for w in c.workers):
            assert time.monotonic() < up_by, c.output()
            time.sleep(0.1)
        held = leases(admin_url, dbname)
        owners = [names[0] for key, names in held.items() if key < SHARDS]
        names = [c.worker_name(i) for i in range(len(c.workers))]
        victim = max(range(len(names)), key=lambda i: owners.count(names[i]))
        started = time.monotonic()
        c.restart_worker(victim)
        noted = False
        while True:
            try:
                shards = [k for k in leases(admin_url, dbname) if k < SHARDS]
            except psycopg.OperationalError:  # the server full of other tests' clients
                time.sleep(0.05)
                continue
            if len(shards) == SHARDS:
                taken.append(time.monotonic() - started)
                break
            if not noted and time.monotonic() - started > RELEASE_TYPICAL:
                noted = True
                print(f"slow re-lease after killing {names[victim]}: {activity(admin_url, dbname)}")
            if time.monotonic() - started > 60:
                taken.append(float("inf"))
                break
            time.sleep(0.05)
    return taken


@pytest.mark.timeout(900)
def test_a_cluster_with_kills_gives_the_balances_of_one_serve(pg_admin_url: str) -> None:
    nginx_bin = required_tool("nginx", "/usr/sbin/nginx")
    now = datetime.now(UTC).replace(microsecond=0)
    events = seeded_events(EVENTS, MEMBERS, now)
    users = sorted({e["user_id"] for e in events})

    started = time.monotonic()
    with own_database(pg_admin_url, "loyalty_one") as (url, _name), single_serve(url) as one:
        keys = Keys.create(url)
        accepted, failures = ingest(one.base, keys, events)
        assert (accepted, failures[:3]) == (EVENTS, []), one.output()
        drained(one.base, keys, EVENTS, timeout=300)
        expected = balances(one.base, keys, users)
    single_seconds = time.monotonic() - started
    unreadable = {u: v for u, v in expected.items() if not isinstance(v, dict)}
    assert not unreadable, list(unreadable.items())[:5]
    assert sum(v["lifetime_currency"] for v in expected.values()) > 0

    started = time.monotonic()
    with own_database(pg_admin_url, "loyalty_many") as (url, dbname):
        keys = Keys.create(url)
        with cluster(url, nginx_bin, apis=APIS, workers=WORKERS, **EXTRA) as c:
            watch = Watch(pg_admin_url, dbname)
            stop = threading.Event()
            times: list[float] = []
            killer = threading.Thread(
                target=lambda: times.extend(kill_loop(c, pg_admin_url, dbname, stop))
            )
            killer.start()
            try:  # kills while the stream comes in, and at least KILLS of them
                accepted, failures = ingest(c.base, keys, events)
            finally:
                stop.set()
                killer.join()
            drained(c.base, keys, EVENTS, timeout=240)
            got = balances(c.base, keys, users)
            watch.close()
            output = c.output()
            worker_logs = c.worker_logs()
            api_logs = [p.output() for p in c.apis]
    cluster_seconds = time.monotonic() - started
    print(
        f"{EVENTS} events, {len(users)} members: one serve {single_seconds:.1f} s, "
        f"cluster {cluster_seconds:.1f} s; {len(times)} kills, shards leased again after "
        f"{', '.join(f'{t:.2f}' for t in times)} s; peak connections {watch.peak} "
        f"(total {watch.peak_total}); {len(watch.samples)} samples, {watch.missed} missed"
    )

    assert (accepted, failures[:3]) == (EVENTS, []), output
    unreadable = {u: v for u, v in got.items() if not isinstance(v, dict)}
    assert not unreadable, (len(unreadable), list(unreadable.items())[:5])
    differ = {
        u: {
            k: (expected[u][k], got[u].get(k))
            for k in expected[u]
            if expected[u][k] != got[u].get(k)
        }
        for u in users
        if account(expected[u]) != account(got[u])
    }
    assert not differ, (len(differ), list(differ.items())[:3])

    # kills happened, and after each every shard was leased again within the bound
    assert len(times) >= 2, (times, output)
    assert sorted(times)[len(times) // 2] < RELEASE_TYPICAL, (times, output)
    assert max(times) < RELEASE_BOUND, (times, output)

    # each job: at most one holder in every sample, never an API process; held most of
    # the time (the held ones), seen taken (the per-run ones)
    assert len(watch.samples) >= 20, (len(watch.samples), watch.missed)
    holders: dict[str, set[str]] = {job: set() for job in JOB_LEASES}
    held_samples = dict.fromkeys(JOB_LEASES, 0)
    for _at, sample in watch.samples:
        for job, key in JOB_LEASES.items():
            names = sample.get(key, [])
            assert len(names) <= 1, (job, names)
            holders[job].update(names)
            held_samples[job] += bool(names)
    for job in JOBS_HELD:
        assert holders[job], (job, holders)
    for job in JOB_LEASES:
        assert all(n.startswith("loyalty-worker-") for n in holders[job]), (job, holders)
    # the per-run jobs hold their lease for milliseconds (a sample rarely sees it): their
    # runs are in the workers' logs, never in an API's
    for line in RUN_LINES:
        assert any(line in log for log in worker_logs), line
        assert not any(line in log for log in api_logs), line
    # held most of the time: after a kill of its holder a job's lease is free until another
    # worker's runner asks again (at most every 2 s, application/jobs.py), so each kill
    # may leave it unheld for a couple of seconds (46 of 64 samples held in a run with 4
    # kills over 18 s); a lease nobody takes again fails this by far
    for job in JOBS_HELD:
        assert held_samples[job] >= 0.5 * len(watch.samples), (job, held_samples)
    assert not holders["relay"]  # no relay runs here
    for _at, sample in watch.samples:
        assert all(len(names) == 1 for key, names in sample.items() if key < SHARDS)

    # the connection budget, per process and in all
    assert watch.peak, "no connection seen"
    assert max(watch.peak.values()) <= BUDGET, watch.peak
    assert watch.peak_total <= (APIS + WORKERS) * BUDGET, watch.peak_total
