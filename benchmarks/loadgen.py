"""The HTTP load generator: a separate process with N client threads on keep-alive
``http.client`` connections, sending pre-serialized bodies to 127.0.0.1 only.

Bounded in count (``n_events``) and in time (``time_limit``): a client stops at
whichever comes first. Run it with :func:`run_in_process`.
"""

from __future__ import annotations

import http.client
import itertools
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from benchmarks import data
from benchmarks.cpu import CpuMeter


@dataclass(frozen=True)
class LoadSpec:
    ports: list[int]
    key: str
    clients: int
    n_events: int
    batch_size: int
    seed: int
    now: datetime
    prefix: str
    time_limit: float
    path: str = "/v1/ingress/batches"
    warmup_batches_per_client: int = 2
    # CPU accounting: process trees to watch (name -> pids) and the database to watch.
    watch: dict[str, list[int]] | None = None
    pg_admin_url: str | None = None
    pg_dbname: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load(spec: LoadSpec) -> dict[str, Any]:
    events = data.make_events(spec.n_events, seed=spec.seed, now=spec.now, prefix=spec.prefix)
    bodies = [
        data.body_of(b, f"{spec.prefix}-b{i}")
        for i, b in enumerate(data.batches(events, spec.batch_size))
    ]
    sizes = [len(b) for b in data.batches(events, spec.batch_size)]
    del events
    warm_events = data.make_events(
        spec.clients * spec.warmup_batches_per_client * spec.batch_size,
        seed=spec.seed + 1,
        now=spec.now,
        prefix=spec.prefix + "w",
    )
    warm = [data.body_of(b, "warm") for b in data.batches(warm_events, spec.batch_size)]
    headers = {"Authorization": f"Bearer {spec.key}", "Content-Type": "application/json"}
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0, "sent": 0, "errors": 0}
    first_error: list[str] = []
    ready = threading.Barrier(spec.clients + 1)  # every client warmed up
    go = threading.Barrier(spec.clients + 1)  # the clock and the CPU meter started
    deadline = [0.0]

    def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
        conn.request("POST", spec.path, body, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()

    def client(i: int) -> None:
        port = spec.ports[i % len(spec.ports)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for w in range(spec.warmup_batches_per_client):
                status, payload = post(conn, warm[i * spec.warmup_batches_per_client + w])
                if status != 202:
                    raise RuntimeError(f"warm-up answered {status}: {payload[:300]!r}")
        except BaseException as exc:
            first_error.append(repr(exc))
            ready.abort()
            raise
        ready.wait()
        go.wait()
        mine: list[float] = []
        while True:
            idx = next(counter)
            if idx >= len(bodies) or time.perf_counter() > deadline[0]:
                break
            t0 = time.perf_counter()
            try:
                status, payload = post(conn, bodies[idx])
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    totals["errors"] += 1
                    first_error.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            mine.append(time.perf_counter() - t0)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                totals["sent"] += sizes[idx]
                if status == 202:
                    answer = orjson.loads(payload)
                    totals["accepted"] += answer["accepted"]
                    totals["duplicates"] += answer["duplicates"]
                    totals["rejected"] += len(answer["rejected"])
                else:
                    totals["errors"] += 1
                    if not first_error:
                        first_error.append(f"{status}: {payload[:300]!r}")
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(spec.clients)]
    for t in threads:
        t.start()
    meter = CpuMeter(spec.watch or {}, spec.pg_admin_url, spec.pg_dbname)
    try:
        ready.wait(timeout=120)
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
        **totals,
        "elapsed_s": elapsed,
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "first_error": first_error[0] if first_error else None,
        "timed_out": elapsed >= spec.time_limit,
    }


def _child(work: Callable[[Any], dict[str, Any]], spec: Any, conn: Any) -> None:
    try:
        conn.send(("ok", work(spec)))
    except BaseException as exc:  # report to the parent instead of dying silently
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


class ChildProcess:
    """``work(spec)`` in its own (spawned) process: ``start`` then ``result``. ``work``
    must be a module-level function and ``spec`` picklable (a dataclass)."""

    def __init__(
        self, work: Callable[[Any], dict[str, Any]], spec: Any, *, limit: float, what: str
    ) -> None:
        ctx = mp.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(work, spec, send), daemon=True)
        self._limit = limit
        self._what = what

    def start(self) -> ChildProcess:
        self._proc.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def result(self) -> dict[str, Any]:
        try:
            if not self._recv.poll(self._limit):
                raise TimeoutError(f"{self._what} did not report in time")
            status, payload = self._recv.recv()
        finally:
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
        if status != "ok":
            raise RuntimeError(f"{self._what} failed: {payload}")
        result: dict[str, Any] = payload
        return result


class LoadProcess(ChildProcess):
    """The ingest load generator in its own (spawned) process."""

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(_load, spec, limit=spec.time_limit + 300, what="load generator")


def run_in_process(spec: LoadSpec) -> dict[str, Any]:
    return LoadProcess(spec).start().result()
