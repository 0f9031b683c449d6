"""Soak: mixed traffic (ingest, reads, spends) at a fraction of measured capacity for a
long time, with the pipeline worker killed (``kill -9``) and restarted in the middle.

The load generator keeps its own tally: every event it got accepted and every spend it
got a 200 for (an order id retried after a timeout or a 503 is counted once). At the end
the pipeline is drained and every member's balance read back must equal the tally; the
ingress log must hold exactly the distinct events sent. 5xx answers are counted inside
and outside the restart window (the API runs in its own process, so none is expected
anywhere).

    python -m benchmarks.soak --duration 600            # `make soak`: 10 minutes
    python -m benchmarks.soak --duration 60 --capacity-seconds 10

Runs on a throwaway PostgreSQL cluster of its own (initdb + pg_ctl, as
tests/e2e/test_faults.py), on a fresh database of a running server (``--shared
--admin-url``; dropped at the end) or on a SQLite file (``--sqlite``). Writes
benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

LOYALTY = [sys.executable, "-m", "loyalty.cli"]
RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
CURRENCY, RANK_POINTS = 3, 2  # per soak_play event: no cap, no multiplier
RULES = {
    "rules": [{"event_type": "soak_play", "currency": CURRENCY, "rank_points": RANK_POINTS}],
    "ranks": [{"name": "bronze", "min_rank_points": 0, "privileges": []}],
}


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    env.update({"LOYALTY_DATABASE_URL": url, **extra})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(url: str, role: str, name: str) -> str:
    done = subprocess.run(
        [*LOYALTY, "keys", "create", "--role", role, "--name", name],
        env=env_for(url),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/soak.db"
        return
    if not args.shared:  # a throwaway cluster: the shared server's connections are spared
        from tests.e2e.pgcluster import Cluster

        cluster = Cluster(max_connections=120)
        try:
            cluster.start()
            yield cluster.create_database("loyalty")
        finally:
            cluster.destroy()
        return
    name = f"loyalty_soak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        yield args.admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def start(cmd: list[str], url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(cmd, env=env_for(url, **env), stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Tally:
    """What the load generator knows it did (independent of the service)."""

    events: Counter[str] = field(default_factory=Counter)  # user -> accepted events
    spent: Counter[str] = field(default_factory=Counter)  # user -> currency spent
    orders: dict[str, int] = field(default_factory=dict)  # order id -> amount (200 once)
    statuses: Counter[str] = field(default_factory=Counter)
    errors_5xx: list[tuple[float, str, int]] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Load:
    def __init__(self, base: str, keys: dict[str, str], users: int, tally: Tally) -> None:
        self.base = base
        self.keys = keys
        self.users = [f"soak-{i}" for i in range(users)]
        self.tally = tally
        self.local = threading.local()
        self.batch_seq = 0
        self.order_seq = 0
        self.seq_lock = threading.Lock()

    def http(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(base_url=self.base, timeout=30)
        return client  # type: ignore[no-any-return]

    def send(self, method: str, path: str, role: str, **kwargs: Any) -> httpx.Response:
        """Until a definitive answer: retry on 503/429 and transport errors."""
        headers = {"Authorization": f"Bearer {self.keys[role]}"}
        for _ in range(1000):
            try:
                response = self.http().request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                with self.tally.lock:
                    self.tally.statuses[type(exc).__name__] += 1
                    self.tally.requests += 1
                time.sleep(0.05)
                continue
            with self.tally.lock:
                self.tally.requests += 1
                self.tally.statuses[str(response.status_code)] += 1
                if response.status_code >= 500:
                    self.tally.errors_5xx.append(
                        (time.monotonic(), f"{method} {path}", response.status_code)
                    )
            if response.status_code in (429, 503) or response.status_code >= 500:
                time.sleep(0.05)
                continue
            return response
        raise RuntimeError(f"no definitive answer: {method} {path}")

    def ingest(self, rnd: random.Random) -> None:
        with self.seq_lock:
            self.batch_seq += 1
            seq = self.batch_seq
        now = datetime.now(UTC).isoformat()
        events = [
            {
                "event_id": f"b{seq}-e{i}",
                "user_id": rnd.choice(self.users),
                "type": "soak_play",
                "occurred_at": now,
            }
            for i in range(20)
        ]
        response = self.send("POST", "/v1/ingress/batches", "ingest", json={"events": events})
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["accepted"] + body["duplicates"] == 20 and not body["rejected"], body
        with self.tally.lock:
            # a retried batch may come back as duplicates: its events count once anyway
            self.tally.events.update(ev["user_id"] for ev in events)
            self.tally.ops["ingest"] += 1

    def read(self, rnd: random.Random) -> None:
        user = rnd.choice(self.users)
        path = rnd.choice(
            [f"/v1/members/{user}", f"/v1/members/{user}/history?limit=20", "/v1/leaderboard"]
        )
        response = self.send("GET", path, "shop")
        assert response.status_code in (200, 404), response.text
        with self.tally.lock:
            self.tally.ops["read"] += 1

    def spend(self, rnd: random.Random) -> None:
        user = rnd.choice(self.users)
        with self.seq_lock:
            self.order_seq += 1
            order = f"o{self.order_seq}"
        amount = rnd.randint(1, 4)
        body = {"order_id": order, "amount": amount}
        response = self.send("POST", f"/v1/members/{user}/spend", "shop", json=body)
        assert response.status_code in (200, 404, 409), response.text
        if response.status_code == 409:
            assert response.json()["code"] == "insufficient_funds", response.text
        with self.tally.lock:
            self.tally.ops["spend"] += 1
            if response.status_code == 200 and order not in self.tally.orders:
                self.tally.orders[order] = amount
                self.tally.spent[user] += amount

    def op(self, rnd: random.Random) -> None:
        roll = rnd.random()
        if roll < 0.35:
            self.ingest(rnd)
        elif roll < 0.8:
            self.read(rnd)
        else:
            self.spend(rnd)


def run_threads(
    threads: int,
    until: float,
    pace: Callable[[], float | None],
    work: Callable[[random.Random], None],
) -> None:
    errors: list[BaseException] = []

    def loop(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while time.monotonic() < until:
                due = pace()
                if due is not None:
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    if time.monotonic() >= until:
                        return
                work(rnd)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


def pacer(rate: float) -> Callable[[], float]:
    """Open loop: the k-th operation is due at start + k / rate."""
    lock = threading.Lock()
    start = time.monotonic()
    count = 0

    def next_due() -> float:
        nonlocal count
        with lock:
            count += 1
            return start + count / rate

    return next_due


def wait_drained(load: Load, events: int, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = load.send("GET", "/v1/pipeline", "operator").json()
        if body["pending"] == 0 and body["processed_total"] >= events:
            return body  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise RuntimeError(f"pipeline did not drain: {body}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of soak")
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--fraction", type=float, default=0.7, help="of measured capacity")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("LOYALTY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--sqlite", action="store_true", help="use a SQLite file instead")
    parser.add_argument(
        "--shared",
        action="store_true",
        help="a database on --admin-url instead of a throwaway cluster (initdb + pg_ctl)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    logdir = Path(tempfile.mkdtemp(prefix="loyalty-soak-"))
    with database(args) as url:
        subprocess.run([*LOYALTY, "migrate"], env=env_for(url), check=True, capture_output=True)
        keys = {r: create_key(url, r, f"soak-{r}") for r in ("ingest", "shop", "operator")}
        port = free_port()
        api = start(
            [*LOYALTY, "serve", "--no-worker", "--port", str(port)], url, logdir / "api.log"
        )
        worker_env = {"LOYALTY_AWARD_WINDOW_SECONDS": "0.5"}
        worker = start([*LOYALTY, "worker"], url, logdir / "worker.log", **worker_env)
        base = f"http://127.0.0.1:{port}"
        tally = Tally()
        load = Load(base, keys, args.users, tally)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the API did not start")
                time.sleep(0.2)
            assert load.send("PUT", "/v1/rules", "operator", json=RULES).status_code == 200

            # 1. capacity: closed loop, as fast as the threads go
            t0 = time.monotonic()
            run_threads(args.threads, t0 + args.capacity_seconds, lambda: None, load.op)
            capacity = sum(tally.ops.values()) / (time.monotonic() - t0)
            rate = capacity * args.fraction
            print(f"capacity {capacity:.0f} ops/s; soak at {rate:.0f} ops/s", flush=True)
            capacity_ops = dict(tally.ops)

            # 2. soak at `fraction` of it, with a worker kill -9 + restart halfway
            window: dict[str, float] = {}
            soak_start = time.monotonic()

            def restart_worker() -> None:
                nonlocal worker
                time.sleep(args.duration / 2)
                window["start"] = time.monotonic()
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait()
                time.sleep(2)
                worker = start([*LOYALTY, "worker"], url, logdir / "worker.log", **worker_env)
                window["end"] = time.monotonic() + 10  # its start-up and catch-up
                print("worker killed and restarted", flush=True)

            restarter = threading.Thread(target=restart_worker, daemon=True)
            restarter.start()
            ops_before = sum(tally.ops.values())
            run_threads(args.threads, soak_start + args.duration, pacer(rate), load.op)
            soak_seconds = time.monotonic() - soak_start
            soak_ops = sum(tally.ops.values()) - ops_before
            restarter.join()

            # 3. drain, then compare every balance with the tally
            events_sent = sum(tally.events.values())
            pipeline = wait_drained(load, events_sent)
            mismatches = {}
            for user in load.users:
                response = load.send("GET", f"/v1/members/{user}", "shop")
                earned = tally.events[user]
                want = (earned * CURRENCY - tally.spent[user], earned * RANK_POINTS)
                got = (
                    (response.json()["currency"], response.json()["rank_points"])
                    if response.status_code == 200
                    else (0, 0)
                )
                if got != want:
                    mismatches[user] = {"want": want, "got": got}
            if url.startswith("postgresql"):
                with psycopg.connect(url) as conn:
                    row = conn.execute("SELECT count(*) FROM ingress_events").fetchone()
                    rows = int(row[0]) if row else -1
            else:
                import sqlite3

                with sqlite3.connect(url[len("sqlite:///") :]) as conn:
                    rows = int(conn.execute("SELECT count(*) FROM ingress_events").fetchone()[0])
        finally:
            stop(worker)
            stop(api)

    inside = [e for e in tally.errors_5xx if window and window["start"] <= e[0] <= window["end"]]
    outside = [e for e in tally.errors_5xx if e not in inside]
    result = {
        "backend": "sqlite" if args.sqlite else "postgresql",
        "capacity_ops_per_s": round(capacity, 1),
        "capacity_ops": capacity_ops,
        "target_ops_per_s": round(rate, 1),
        "soak_seconds": round(soak_seconds, 1),
        "soak_ops": soak_ops,
        "achieved_ops_per_s": round(soak_ops / soak_seconds, 1),
        "ops": dict(tally.ops),
        "http_requests": tally.requests,
        "statuses": dict(tally.statuses),
        "faults_injected": {"worker_kill_9_and_restart": 1},
        "5xx_inside_restart_window": len(inside),
        "5xx_outside_restart_window": len(outside),
        "events_accepted": events_sent,
        "ingress_rows": rows,
        "spends_applied": len(tally.orders),
        "currency_spent": sum(tally.spent.values()),
        "pipeline": pipeline,
        "balance_mismatches": len(mismatches),
        "mismatch_examples": dict(list(mismatches.items())[:5]),
        "logs": str(logdir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = not outside and not mismatches and rows == events_sent
    print("SOAK OK" if ok else "SOAK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
