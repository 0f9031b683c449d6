"""A request load generator for the member endpoints: a separate (spawned) process with
N client threads on keep-alive ``http.client`` connections to 127.0.0.1 only.

Kinds of request (each client builds its own from the index of the request):

- ``member``: ``GET /v1/members/user-NNNNN`` of a random member;
- ``forget``: ``GET /v1/forget-requests/<id>`` of a random one of ``ids`` (completed
  requests): authentication plus one primary-key read that answers 200 — the cheapest
  authenticated read of a row by key;
- ``spend``: ``POST /v1/members/user-NNNNN/spend`` of 1, a new order id each time;
- ``fund``: ``POST /v1/members/user-NNNNN/adjustments``, each member once (setup).

Bounded in count (``max_requests``) and in time (``time_limit``); an optional unmeasured
warm-up of ``warmup_s`` seconds comes first.
"""

from __future__ import annotations

import http.client
import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from benchmarks.cpu import CpuMeter
from benchmarks.loadgen import ChildProcess, percentile

Request = tuple[str, str, bytes | None]
KINDS = ("member", "forget", "spend", "fund")


@dataclass(frozen=True)
class ReqSpec:
    ports: list[int]
    key: str
    kind: str
    users: int
    clients: int = 8
    time_limit: float = 10.0
    max_requests: int = 1_000_000
    warmup_s: float = 0.0
    seed: int = 1
    tag: str = "r"
    fund_amount: int = 1_000_000
    user_offset: int = 0
    ids: tuple[str, ...] = ()
    watch: dict[str, list[int]] | None = None
    pg_admin_url: str | None = None
    pg_dbname: str | None = None


def user_name(n: int) -> str:
    return f"user-{n:05d}"


def request_maker(spec: ReqSpec, client: int, tag: str) -> Callable[[int], Request]:
    rnd = random.Random(spec.seed * 1_000 + client)
    users = spec.users
    if spec.kind == "member":
        return lambda _i: ("GET", f"/v1/members/{user_name(rnd.randrange(users))}", None)
    if spec.kind == "forget":
        ids = spec.ids
        if not ids:
            raise ValueError("kind 'forget' needs ids")
        return lambda _i: ("GET", f"/v1/forget-requests/{ids[rnd.randrange(len(ids))]}", None)
    if spec.kind == "spend":

        def spend(i: int) -> Request:
            user = user_name(spec.user_offset + rnd.randrange(users))
            body = orjson.dumps({"order_id": f"{tag}-{i}", "amount": 1})
            return ("POST", f"/v1/members/{user}/spend", body)

        return spend
    if spec.kind == "fund":

        def fund(i: int) -> Request:
            body = orjson.dumps(
                {
                    "adjustment_id": f"{tag}-{i}",
                    "currency": spec.fund_amount,
                    "rank_points": 0,
                    "reason": "benchmark funding",
                }
            )
            return ("POST", f"/v1/members/{user_name(spec.user_offset + i)}/adjustments", body)

        return fund
    raise ValueError(f"unknown kind {spec.kind!r}; one of {KINDS}")


def _load(spec: ReqSpec) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {spec.key}", "Content-Type": "application/json"}
    ok_status = 200
    limit = spec.users if spec.kind == "fund" else spec.max_requests
    counter = itertools.count()
    warm_counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = [0]
    first_error: list[str] = []
    ready = threading.Barrier(spec.clients + 1)
    go = threading.Barrier(spec.clients + 1)
    deadline = [0.0]

    def send(conn: http.client.HTTPConnection, req: Request) -> tuple[int, bytes]:
        method, path, body = req
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()

    def client(i: int) -> None:
        port = spec.ports[i % len(spec.ports)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            warm = request_maker(spec, i + 10_000, spec.tag + "w")
            warm_until = time.perf_counter() + spec.warmup_s
            while spec.warmup_s and time.perf_counter() < warm_until:
                send(conn, warm(next(warm_counter)))
        except BaseException as exc:
            first_error.append(f"warm-up: {exc!r}")
            ready.abort()
            raise
        make = request_maker(spec, i, spec.tag)
        ready.wait()
        go.wait()
        mine: list[float] = []
        while True:
            idx = next(counter)
            if idx >= limit or time.perf_counter() > deadline[0]:
                break
            req = make(idx)
            t0 = time.perf_counter()
            try:
                status, payload = send(conn, req)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors[0] += 1
                    first_error.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            mine.append(time.perf_counter() - t0)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status != ok_status:
                    errors[0] += 1
                    if len(first_error) < 3:
                        first_error.append(f"{status} {req[1]}: {payload[:200]!r}")
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(spec.clients)]
    for t in threads:
        t.start()
    meter = CpuMeter(spec.watch or {}, spec.pg_admin_url, spec.pg_dbname)
    try:
        ready.wait(timeout=spec.warmup_s + 60)
    except threading.BrokenBarrierError:
        go.abort()
        raise RuntimeError(f"warm-up failed: {first_error[:1]}") from None
    meter.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline[0] = t0 + spec.time_limit
    go.wait(timeout=30)
    for t in threads:
        t.join(timeout=spec.time_limit + 120)
    elapsed = time.perf_counter() - t0
    own = time.process_time() - cpu0
    cpu = meter.stop(own)
    return {
        "cpu_s": {"loadgen": own, **cpu},
        "pg_waits": meter.pg_waits(),
        "requests": len(latencies),
        "elapsed_s": elapsed,
        "rate": len(latencies) / elapsed if elapsed else 0.0,
        "errors": errors[0],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "first_error": first_error[0] if first_error else None,
        "timed_out": elapsed >= spec.time_limit,
    }


def run_in_process(spec: ReqSpec) -> dict[str, Any]:
    """Run the load in a spawned process; bounded by ``time_limit`` plus a margin."""
    limit = spec.time_limit + spec.warmup_s + 180
    return ChildProcess(_load, spec, limit=limit, what="request load generator").start().result()
