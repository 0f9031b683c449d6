"""Real ``loyalty`` topologies on one PostgreSQL database, for the scale-out test and the
scale-out benchmark: one ``serve``, or N ``serve --no-worker`` behind the shipped nginx
config plus K ``loyalty worker``; a seeded stream ingested through either; what every
process holds in ``pg_stat_activity`` and ``pg_locks``, per ``application_name``.

Every process gets its own ``LOYALTY_DB_APPLICATION_NAME`` (``loyalty-api-0``,
``loyalty-worker-1.3`` for the third incarnation of worker 1, ...), so the database says
which process holds which connection and which lease."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg

from loyalty.adapters.pipeline_store import SHARD_LEASE_NS
from tests.e2e.live import LOYALTY, create_key, env_for, free_port, wait_healthy

NGINX_CONF = Path(__file__).resolve().parents[2] / "docs" / "nginx.conf"


@contextmanager
def own_database(admin_url: str, prefix: str) -> Iterator[tuple[str, str]]:
    """A fresh database (url, name), migrated, with no connection but the processes'."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        done = subprocess.run(
            [*LOYALTY, "migrate"], env=env_for(url), capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr
        yield url, name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@dataclass
class Keys:
    operator: dict[str, str]
    ingest: dict[str, str]
    shop: dict[str, str]

    @classmethod
    def create(cls, url: str) -> Keys:
        def bearer(role: str) -> dict[str, str]:
            return {"Authorization": "Bearer " + create_key(url, role, role)}

        return cls(bearer("operator"), bearer("ingest"), bearer("shop"))


@dataclass
class Proc:
    """One ``loyalty`` process, its output in a file (a pipe nobody reads would block)."""

    args: list[str]
    env: dict[str, str]
    name: str
    popen: subprocess.Popen[bytes] = field(init=False)
    log: IO[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.log = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            [*LOYALTY, *self.args], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()


def nginx_conf(tmp: Path, api_ports: list[int], port: int) -> Path:
    """docs/nginx.conf with its upstream on ``api_ports`` of 127.0.0.1 and listening on
    ``port``: what Docker's DNS gives it (one address per replica of ``api``)."""
    text = NGINX_CONF.read_text()
    servers = "\n        ".join(f"server 127.0.0.1:{p};" for p in api_ports)
    for old, new in [
        ("server api:8000;", servers),
        ("listen 8000;", f"listen 127.0.0.1:{port};"),
        ("pid /tmp/nginx-loyalty.pid;", f"pid {tmp}/nginx.pid;"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


@contextmanager
def nginx(nginx_bin: str, api_ports: list[int]) -> Iterator[str]:
    """The shipped nginx config in front of ``api_ports``; yields its base URL."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        tmp.chmod(0o755)
        port = free_port()
        conf = nginx_conf(tmp, api_ports, port)
        checked = subprocess.run(
            [nginx_bin, "-t", "-c", str(conf), "-p", str(tmp), "-e", "stderr"],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stderr
        proxy = subprocess.Popen(
            [nginx_bin, "-c", str(conf), "-p", str(tmp), "-e", "stderr", "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proxy, base, lambda: "nginx")
            yield base
        finally:
            proxy.terminate()
            proxy.wait(timeout=15)


@dataclass
class Cluster:
    url: str
    base: str  # where clients go: the API, or nginx in front of the APIs
    apis: list[Proc]
    workers: list[Proc]
    worker_env: dict[str, str]
    generations: list[int]
    retired: list[Proc] = field(default_factory=list)  # killed workers (their output)

    def restart_worker(self, i: int) -> Proc:
        """Kill -9 worker ``i`` and start it again, under a new application_name."""
        self.workers[i].kill9()
        self.retired.append(self.workers[i])
        self.generations[i] += 1
        env = {**self.worker_env, "LOYALTY_DB_APPLICATION_NAME": self.worker_name(i)}
        self.workers[i] = Proc(["worker"], env, self.worker_name(i))
        return self.workers[i]

    def worker_name(self, i: int) -> str:
        return f"loyalty-worker-{i}.{self.generations[i]}"

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in self.apis + self.workers)

    def worker_logs(self) -> list[str]:
        """The whole output of every worker that ran, killed ones included."""
        return [p.output() for p in self.retired + self.workers]


@contextmanager
def single_serve(url: str, **extra: str) -> Iterator[Cluster]:
    """One ``loyalty serve`` (the API and its two worker children)."""
    port = free_port()
    env = env_for(url, LOYALTY_DB_APPLICATION_NAME="loyalty-serve", **extra)
    proc = Proc(["serve", "--port", str(port)], env, "serve")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc.popen, base, proc.output)
        yield Cluster(url, base, [proc], [], env, [])
    finally:
        proc.stop()


@contextmanager
def cluster(
    url: str,
    nginx_bin: str,
    *,
    apis: int,
    workers: int,
    worker_args: list[list[str]] | None = None,
    **extra: str,
) -> Iterator[Cluster]:
    """``apis`` x ``serve --no-worker`` behind the shipped nginx config and ``workers`` x
    ``loyalty worker`` (every shard each, unless ``worker_args``), on ``url``."""
    with ExitStack() as stack:
        procs: list[Proc] = []
        stack.callback(lambda: [p.stop() for p in procs])
        ports = [free_port() for _ in range(apis)]
        api_procs = []
        for i, port in enumerate(ports):
            env = env_for(url, LOYALTY_DB_APPLICATION_NAME=f"loyalty-api-{i}", **extra)
            api_procs.append(
                Proc(["serve", "--no-worker", "--port", str(port)], env, f"loyalty-api-{i}")
            )
        procs.extend(api_procs)
        worker_env = env_for(url, **extra)
        found = Cluster(url, "", api_procs, [], worker_env, [0] * workers)
        for i in range(workers):
            env = {**worker_env, "LOYALTY_DB_APPLICATION_NAME": found.worker_name(i)}
            args = ["worker", *(worker_args[i] if worker_args else [])]
            found.workers.append(Proc(args, env, found.worker_name(i)))
        stack.callback(lambda: [p.stop() for p in found.workers])
        for proc, port in zip(api_procs, ports, strict=True):
            wait_healthy(proc.popen, f"http://127.0.0.1:{port}", proc.output)
        found.base = stack.enter_context(nginx(nginx_bin, ports)) if apis > 1 else ""
        if not found.base:
            found.base = f"http://127.0.0.1:{ports[0]}"
        yield found


# -- the seeded stream -------------------------------------------------------------------


def seeded_events(n: int, members: int, now: datetime, seed: int = 31) -> list[dict[str, Any]]:
    from benchmarks.data import make_events

    return make_events(n, seed=seed, now=now, prefix=f"s{seed}", users=members)


def ingest(
    base: str, keys: Keys, events: list[dict[str, Any]], *, clients: int = 3, batch: int = 500
) -> tuple[int, list[str]]:
    """Post ``events`` in batches from ``clients`` threads, each sending the events of its
    own members in the stream's order (so every member's events arrive in the same order
    whatever the interleaving). Returns (events accepted, failures)."""
    parts: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    for e in events:
        parts[zlib.crc32(e["user_id"].encode()) % clients].append(e)
    accepted = [0] * clients
    failures: list[str] = []

    def send(i: int) -> None:
        with httpx.Client(base_url=base, timeout=120, headers=keys.ingest) as h:
            part = parts[i]
            for n, start in enumerate(range(0, len(part), batch)):
                body = {"batch_id": f"c{i}-{n}", "events": part[start : start + batch]}
                r = h.post("/v1/ingress/batches", json=body)
                if r.status_code >= 300:
                    failures.append(f"{r.status_code} {r.text[:300]}")
                    continue
                accepted[i] += int(r.json()["accepted"])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(accepted), failures


def drained(base: str, keys: Keys, expected: int, timeout: float) -> dict[str, Any]:
    """Wait until the pipeline has weighed ``expected`` events and nothing is pending."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = httpx.get(base + "/v1/pipeline", headers=keys.operator, timeout=30)
        if r.status_code == 200:
            status = r.json()
            if status["pending"] == 0 and status["processed_total"] >= expected:
                return status
        time.sleep(0.25)
    raise AssertionError(f"the pipeline did not drain in {timeout} s: {status}")


def balances(base: str, keys: Keys, users: list[str]) -> dict[str, Any]:
    """Every member's account as GET /v1/members/{id} answers it (or the failure)."""
    out: dict[str, Any] = {}
    with httpx.Client(base_url=base, timeout=60, headers=keys.shop) as h:
        for user in users:
            r = h.get(f"/v1/members/{user}")
            out[user] = r.json() if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
    return out


# -- what the database sees ----------------------------------------------------------------


def connections(admin_url: str, dbname: str) -> dict[str, int]:
    """Connections to ``dbname`` per application_name."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s GROUP BY 1",
            (dbname,),
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def leases(admin_url: str, dbname: str) -> dict[int, list[str]]:
    """Lease key (shard number, or a job's key) -> application_names of its holders."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT l.objid, a.application_name FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s "
            "AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database "
            "WHERE datname = %s)",
            (SHARD_LEASE_NS, dbname),
        ).fetchall()
    found: dict[int, list[str]] = {}
    for key, name in rows:
        found.setdefault(int(key), []).append(str(name))
    return found
