"""The ingress log on NATS JetStream beside the PostgreSQL one (issue 31, item 9), in
one run, at the ingress log's own interface (no HTTP: the API's share is the same for
both and is measured by ``ingest``/``scale_out_ingest``).

``jetstream_ingest``: the same events stored in batches of 2,000 through
``PostgresIngressLog.store`` (binary COPY + de-dup keys), through
``JetStreamIngressLog.store`` (keys claimed in PostgreSQL, published, every ack awaited,
keys confirmed) and by a bare JetStream publish of the same payloads (publish, await the
acks; no keys). ``jetstream_pipeline``: the same backlog weighed by the pipeline
(``build_pipeline(...).drain``, accounts recorded at the end) from PostgreSQL and from
JetStream, and read by a bare ordered consume (nats-py's ordered push consumer, every
message of the stream once, nothing done with it).

NATS: ``LOYALTY_BENCH_NATS`` (default the machine's nats://127.0.0.1:4222); each run
uses streams of its own and deletes them at the end."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import orjson

from benchmarks.framework import Context, benchmark
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog
from loyalty.adapters.nats_log import JetStreamIngressLog, encode, jetstream_log, msg_id
from loyalty.application.ingress import IngressRecord, shard_of
from loyalty.bootstrap import build_pipeline
from loyalty.config import Settings

NATS_URL = os.environ.get("LOYALTY_BENCH_NATS", "nats://127.0.0.1:4222")
BATCH = 2_000
TYPES = ["logged_on", "played_game", "joined_competition", "made_purchase"]


def _unreachable() -> dict[str, Any] | None:
    """A result saying the benchmark did not run when NATS does not answer (outside CI;
    under CI, where .ci/run starts it, that is an error)."""
    host, _, port = NATS_URL.removeprefix("nats://").partition(":")
    try:
        socket.create_connection((host, int(port or 4222)), timeout=2).close()
    except OSError as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"NATS is required in CI: {NATS_URL}: {exc}") from exc
        return {"value": None, "unit": "events/s", "skipped": f"NATS unreachable: {exc}"}
    return None


def _records(n: int, users: int, prefix: str) -> list[IngressRecord]:
    rnd = random.Random(41)
    now = datetime.now(UTC).replace(microsecond=0)
    out = []
    for i in range(n):
        user = f"user-{rnd.randrange(users)}"
        out.append(
            IngressRecord(
                shard_of(user, 16),
                "bench",
                f"{prefix}-{i}",
                user,
                rnd.choice(TYPES),
                now - timedelta(seconds=rnd.randrange(3600)),
                '{"result": "win"}' if i % 3 == 0 else "{}",
            )
        )
    return out


def _settings(url: str, stream: str) -> Settings:
    return Settings(database_url=url, ingress_url=NATS_URL, ingress_stream=stream, db_pool_size=4)


async def _bare_publish(stream: str, records: list[IngressRecord]) -> float:
    """Seconds to publish ``records`` (batches of BATCH, every ack awaited per batch)."""
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.*"])
        started = time.perf_counter()
        for start in range(0, len(records), BATCH):
            futures = [
                await js.publish_async(
                    f"{stream.lower()}.{r.shard}",
                    encode(r),
                    headers={"Nats-Msg-Id": msg_id(r.source, r.event_id)},
                )
                for r in records[start : start + BATCH]
            ]
            await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await nc.close()


async def _bare_consume(stream: str, total: int) -> float:
    """Seconds to receive every message of ``stream`` once, in order (an ordered push
    consumer), doing nothing with them."""
    nc = await nats.connect(NATS_URL, pending_size=256 * 1024 * 1024)
    try:
        js = nc.jetstream()
        done = asyncio.get_running_loop().create_future()
        seen = 0

        async def on_msg(msg: Any) -> None:
            nonlocal seen
            orjson.loads(msg.data)  # what any reader does: parse the event
            seen += 1
            if seen == total and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        sub = await js.subscribe(
            f"{stream.lower()}.*",
            stream=stream,
            ordered_consumer=True,
            cb=on_msg,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        await asyncio.wait_for(done, 600)
        elapsed = time.perf_counter() - started
        await sub.unsubscribe()
        return elapsed
    finally:
        await nc.close()


async def _delete_streams(names: list[str]) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for name in names:
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


def _store_all(
    log: PostgresIngressLog | JetStreamIngressLog, records: list[IngressRecord]
) -> float:
    started = time.perf_counter()
    for start in range(0, len(records), BATCH):
        stored = log.store(records[start : start + BATCH])
        if stored.inserted != len(records[start : start + BATCH]):
            raise RuntimeError(f"stored {stored.inserted} of a batch")
    return time.perf_counter() - started


@benchmark("jetstream_ingest", order=96)
def jetstream_ingest(ctx: Context) -> dict[str, Any]:
    """Ingress log stores/s: JetStream (keys in PostgreSQL) vs bare publish vs PostgreSQL."""
    if (skipped := _unreachable()) is not None:
        return skipped
    n = ctx.pick(smoke=4_000, quick=60_000, full=200_000)
    records = _records(n, 2_000, "ji")
    run = uuid.uuid4().hex[:8].upper()
    streams = [f"BENCH_JI_{run}", f"BENCH_JB_{run}"]
    pg_db = Database(Settings(database_url=ctx.new_pg_database("ji_pg"), db_pool_size=4))
    js_db = Database(_settings(ctx.new_pg_database("ji_js"), streams[0]))
    try:
        pg_s = _store_all(PostgresIngressLog(pg_db), records)
        js_s = _store_all(jetstream_log(js_db), records)
        bare_s = asyncio.run(_bare_publish(streams[1], records))
    finally:
        pg_db.dispose()
        js_db.dispose()
        asyncio.run(_delete_streams(streams))
    rate = {k: n / s for k, s in (("pg", pg_s), ("js", js_s), ("bare", bare_s))}
    return {
        "value": rate["js"],
        "unit": "events/s",
        "baseline": "PostgreSQL ingress log (COPY + keys), same events",
        "baseline_value": rate["pg"],
        "bare_jetstream_publish_events_s": rate["bare"],
        "jetstream_vs_bare": rate["js"] / rate["bare"],
        "events": n,
        "batch": BATCH,
    }


@benchmark("jetstream_pipeline", order=97)
def jetstream_pipeline(ctx: Context) -> dict[str, Any]:
    """Pipeline events/s from JetStream vs a bare ordered consume vs from PostgreSQL."""
    if (skipped := _unreachable()) is not None:
        return skipped
    n = ctx.pick(smoke=4_000, quick=60_000, full=200_000)
    records = _records(n, 2_000, "jp")
    run = uuid.uuid4().hex[:8].upper()
    stream = f"BENCH_JP_{run}"
    pg_db = Database(Settings(database_url=ctx.new_pg_database("jp_pg"), db_pool_size=4))
    js_db = Database(_settings(ctx.new_pg_database("jp_js"), stream))
    try:
        _store_all(PostgresIngressLog(pg_db), records)
        _store_all(jetstream_log(js_db), records)
        timings = {}
        for label, db in (("pg", pg_db), ("js", js_db)):
            pipeline = build_pipeline(db)
            started = time.perf_counter()
            done = pipeline.drain(range(16))
            pipeline.record_all(range(16))
            timings[label] = time.perf_counter() - started
            if done != n:
                raise RuntimeError(f"{label}: the pipeline processed {done} of {n}")
        bare_s = asyncio.run(_bare_consume(stream, n))
    finally:
        pg_db.dispose()
        js_db.dispose()
        asyncio.run(_delete_streams([stream]))
    rate = {"pg": n / timings["pg"], "js": n / timings["js"], "bare": n / bare_s}
    return {
        "value": rate["js"],
        "unit": "events/s",
        "baseline": "the pipeline from the PostgreSQL ingress log, same backlog",
        "baseline_value": rate["pg"],
        "bare_ordered_consume_events_s": rate["bare"],
        "jetstream_pipeline_vs_bare_consume": rate["js"] / rate["bare"],
        "events": n,
    }
