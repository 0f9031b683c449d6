"""The ingress log on NATS JetStream (issue 31 part 2; ``LOYALTY_INGRESS_URL=nats://...``).

One stream (``LOYALTY_INGRESS_STREAM``), one subject per shard (``<stream>.<shard>``,
lower case), file storage. The database stays the system of record for everything else
(accounts, checkpoints, pending, caps, rollups) and keeps the de-duplication keys.

*Store* (the API's batch): the batch's keys are claimed in the database first
(``stream_ingress_keys``, INSERT ... ON CONFLICT DO NOTHING, ``seq`` NULL), the new ones
are published with ``Nats-Msg-Id`` and the batch is answered only when JetStream has
acknowledged every message (publish acks: stored), then the claims are confirmed with
the acknowledged stream sequences. A key found claimed but not confirmed (another API
has it in flight, or died between its claim and its confirm) is published again under
the same ``Nats-Msg-Id``: within JetStream's duplicate window the ack says duplicate
and names the stored sequence, so it is stored once. A claim older than that window is
resolved by looking for its message in the stream (the shard's messages stored from the
claim on): found, it is confirmed as a duplicate; not found, it is published.

*Read* (the pipeline): a position is ``(0, stream sequence)``; a shard's messages are
its subject's, in stream order, and a sequence JetStream has acknowledged never has an
unstored lower one behind it (one server), so reading past the checkpoint's sequence is
gap-safe like the database's (txid, seq). The checkpoint's compare-and-set stores the
sequence in the same transaction as pending, caps and rollups. Reads use a pull consumer
per shard (ephemeral, AckNone, from the wanted sequence, in memory); its delivery
sequence is checked to be contiguous, and anything unexpected drops the consumer and
reads again from the last position returned.

The nats-py client is asyncio: one event loop thread per process runs it, and the
synchronous callers wait on it (:class:`_Client`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import orjson
import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from loyalty.adapters.db import Database, DatabaseUnavailable
from loyalty.adapters.ingress_log import StoredIngress
from loyalty.adapters.tables import stream_ingress_keys
from loyalty.application.ingress import IngressRecord, Stored, shard_of

log = logging.getLogger("loyalty.ingress.jetstream")

Position = tuple[int, int]
T = TypeVar("T")

_TIMEOUT = 10.0  # seconds for one request to the server (an outage is an error after it)
_PUBLISH_TIMEOUT = 10.0  # seconds a batch waits for its publish acks
_FETCH = 5000  # messages per pull request
_KEY_CHUNK = 400  # keys per statement (SQLite's bound-parameter limit)


CONFIRM_KEYS = (
    "UPDATE stream_ingress_keys k SET seq = (e->>2)::bigint "
    "FROM jsonb_array_elements(%s::text::jsonb) AS e CROSS JOIN LATERAL "
    "(SELECT ctid FROM stream_ingress_keys "
    "WHERE source = e->>0 AND event_id = e->>1 LIMIT 1) r "
    "WHERE k.ctid = r.ctid"
)
"""Note the acknowledged stream sequence of a JSON array of [source, event_id, seq], one
primary-key probe each (PostgreSQL; see ``pending_store.PENDING_AT_REVISION``)."""


class JetStreamUnavailable(DatabaseUnavailable):
    """The NATS server cannot be reached or did not answer (HTTP 503; the loops retry)."""


def _key_in(keys: set[tuple[str, str]], row: StoredIngress, _stored_at: datetime) -> bool:
    return (row.source, row.event_id) in keys


def sqlite_stamp(moment: datetime) -> str:
    """How SQLAlchemy stores a DateTime on SQLite (so the table's reads parse it)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def subject_prefix(stream: str) -> str:
    return stream.lower()


def msg_id(source: str, event_id: str) -> str:
    """The Nats-Msg-Id of an event: a digest of its key (header-safe, fixed length)."""
    return hashlib.blake2b(f"{source}\x00{event_id}".encode(), digest_size=16).hexdigest()


def fingerprint(r: IngressRecord) -> int:
    """The content of an event as a signed 64-bit digest (a resend with other content
    is a conflict)."""
    attributes = orjson.dumps(orjson.loads(r.attributes_json), option=orjson.OPT_SORT_KEYS)
    moment = r.occurred_at.astimezone(UTC).isoformat()
    digest = hashlib.blake2b(
        b"\x00".join([r.user_id.encode(), r.type.encode(), moment.encode(), attributes]),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def encode(r: IngressRecord) -> bytes:
    """A message's payload: a JSON array, the attributes' JSON text spliced in as is."""
    head = orjson.dumps(
        [r.source, r.event_id, r.user_id, r.type, r.occurred_at.astimezone(UTC).isoformat()]
    )
    return head[:-1] + b"," + r.attributes_json.encode() + b"]"


def decode(seq: int, shard: int, data: bytes) -> StoredIngress:
    source, event_id, user_id, event_type, occurred, attributes = orjson.loads(data)
    return StoredIngress(
        0,
        seq,
        shard,
        source,
        event_id,
        user_id,
        event_type,
        datetime.fromisoformat(occurred),
        attributes,
    )


class _Client:
    """One NATS connection per (process, URL), run on its own event loop thread."""

    _lock = threading.Lock()
    _clients: dict[str, _Client] = {}

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="nats-client", daemon=True
        )
        self._thread.start()
        self._nc: NATS | None = None

    @classmethod
    def of(cls, url: str) -> _Client:
        with cls._lock:
            found = cls._clients.get(url)
            if found is None:
                found = cls._clients[url] = _Client(url)
            return found

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = _TIMEOUT * 3) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            raise JetStreamUnavailable(f"NATS at {self.url}: no answer in time") from exc
        except (nats.errors.Error, OSError) as exc:
            raise JetStreamUnavailable(f"NATS at {self.url}: {exc!r}") from exc

    async def nc(self) -> NATS:
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                self.url,
                connect_timeout=2,
                reconnect_time_wait=0.25,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                pending_size=64 * 1024 * 1024,
                name="loyalty",
                error_cb=self._error,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
            )
        return self._nc

    async def _error(self, exc: Exception) -> None:
        log.debug("NATS at %s: %r", self.url, exc)  # the callers' errors say it

    async def _disconnected(self) -> None:
        log.warning("NATS at %s: disconnected, reconnecting", self.url)

    async def _reconnected(self) -> None:
        log.warning("NATS at %s: reconnected", self.url)

    def close(self) -> None:
        async def _close() -> None:
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()

        try:
            self.run(_close(), 5)
        finally:
            with self._lock:
                if self._clients.get(self.url) is self:
                    del self._clients[self.url]
            self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class _Reader:
    """A shard's pull consumer and what it has delivered past ``after``."""

    name: str
    inbox: str
    sub: Any
    after: int  # the stream sequence every buffered/next message follows
    delivered: int = 0  # the consumer's delivery sequence of the last message taken
    buffer: list[StoredIngress] = field(default_factory=list)
    received: list[Msg] = field(default_factory=list)  # of the pull under way
    expect: int = 0  # messages the pull under way asked for
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def _sequences(msg: Msg) -> tuple[int, int]:
    """(stream, consumer delivery) sequences of a JetStream message, from its reply
    subject ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>``
    (split here: nats-py's ``metadata`` builds objects per message)."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6])
    meta = msg.metadata  # the longer form (with a domain and account hash)
    return meta.sequence.stream, meta.sequence.consumer


class JetStreamIngressLog:
    """The ingress log protocol (store; read_after, read_day; pending) on JetStream."""

    def __init__(
        self,
        db: Database,
        url: str,
        *,
        stream: str,
        shard_count: int,
        max_age: timedelta,
        duplicate_window: timedelta,
    ) -> None:
        self._db = db
        self._client = _Client.of(url)
        self.stream = stream
        self.prefix = subject_prefix(stream)
        self.shard_count = shard_count
        self.max_age = max_age
        self.duplicate_window = duplicate_window
        self._readers: dict[int, _Reader] = {}
        self._read_lock = threading.Lock()
        self._ready = False

    # -- the stream --------------------------------------------------------------------
    def subject(self, shard: int) -> str:
        return f"{self.prefix}.{shard}"

    def ensure_stream(self) -> None:
        if not self._ready:
            self._client.run(self._ensure_stream())
            self._ready = True

    async def _ensure_stream(self) -> None:
        js = (await self._client.nc()).jetstream(timeout=_TIMEOUT)
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await js.add_stream(
                name=self.stream,
                subjects=[f"{self.prefix}.*"],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                discard=api.DiscardPolicy.OLD,
                max_age=self.max_age.total_seconds(),
                duplicate_window=self.duplicate_window.total_seconds(),
                allow_direct=True,
            )
        except nats.js.errors.BadRequestError:
            await js.stream_info(self.stream)  # created meanwhile by another process

    def ping(self, timeout: float = 2.0) -> None:
        """Raises :class:`JetStreamUnavailable` unless the server answers for the stream
        within ``timeout`` seconds (``/readyz``: a probe must be short, where a batch
        waits out an outage's reconnect)."""

        async def probe() -> None:
            js = (await self._client.nc()).jetstream(timeout=timeout)
            try:
                await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await self._ensure_stream()  # none yet: the first batch would create it

        self._client.run(probe(), timeout + 1)

    def info(self) -> api.StreamInfo:
        self.ensure_stream()

        async def get() -> api.StreamInfo:
            js = (await self._client.nc()).jetstream(timeout=_TIMEOUT)
            return await js.stream_info(self.stream)

        return self._client.run(get())

    def stream_bytes(self) -> tuple[int, int]:
        """(messages, bytes) the stream holds now."""
        state = self.info().state
        return int(state.messages), int(state.bytes)

    # -- store -------------------------------------------------------------------------
    def append(self, records: Sequence[IngressRecord]) -> int:
        return self.store(records).inserted

    def store(self, records: Sequence[IngressRecord]) -> Stored:
        self.ensure_stream()
        now = datetime.now(UTC)
        keys = [(r.source, r.event_id) for r in records]
        prints = [fingerprint(r) for r in records]
        claimed = self._claim(records, prints, now)
        others = [i for i, key in enumerate(keys) if key not in claimed]
        known = self._known([keys[i] for i in others]) if others else {}
        publish = [i for i, key in enumerate(keys) if key in claimed]
        not_stored: dict[int, bool] = {}
        stale: list[int] = []
        for i in others:
            fp, seq, claimed_at = known[keys[i]]
            if seq is not None or fp != prints[i]:
                not_stored[i] = fp != prints[i]
            elif now - claimed_at < self.duplicate_window - timedelta(seconds=_PUBLISH_TIMEOUT):
                publish.append(i)  # in flight elsewhere, or its API died: same Nats-Msg-Id
            else:
                stale.append(i)
        if stale:  # past JetStream's window: look for the message itself
            found = self._find_published([records[i] for i in stale], known)
            for i in stale:
                if keys[i] in found:
                    not_stored[i] = False
                else:
                    publish.append(i)
            self._confirm({keys[i]: seq for i in stale if (seq := found.get(keys[i]))})
        publish.sort()
        acks = self._client.run(self._publish([records[i] for i in publish]), _PUBLISH_TIMEOUT * 2)
        inserted = 0
        confirmed: dict[tuple[str, str], int] = {}
        for i, (seq, duplicate) in zip(publish, acks, strict=True):
            confirmed[keys[i]] = seq
            if duplicate:
                not_stored[i] = False
            else:
                inserted += 1
        self._confirm(confirmed)
        return Stored(inserted, not_stored)

    def _claim(
        self, records: Sequence[IngressRecord], prints: list[int], now: datetime
    ) -> set[tuple[str, str]]:
        """Claim the batch's keys (one statement, the rows as one JSON document);
        returns those claimed now (new)."""
        rows = orjson.dumps(
            [
                [
                    r.source,
                    r.event_id,
                    r.occurred_at.astimezone(UTC).date().isoformat(),
                    r.shard,
                    fp,
                ]
                for r, fp in zip(records, prints, strict=True)
            ]
        ).decode()
        if self._db.backend == "postgresql":
            statement = (
                "INSERT INTO stream_ingress_keys "
                "(source, event_id, day, shard, fingerprint, claimed_at) "
                "SELECT e->>0, e->>1, (e->>2)::date, (e->>3)::smallint, (e->>4)::bigint, %s "
                "FROM jsonb_array_elements(%s::text::jsonb) AS e "
                "ON CONFLICT DO NOTHING RETURNING source, event_id"
            )
            params: tuple[Any, ...] = (now, rows)
        else:
            statement = (
                "INSERT INTO stream_ingress_keys "
                "(source, event_id, day, shard, fingerprint, claimed_at) "
                "SELECT value->>0, value->>1, value->>2, value->>3, value->>4, ? "
                "FROM json_each(?) WHERE true "
                "ON CONFLICT DO NOTHING RETURNING source, event_id"
            )
            params = (sqlite_stamp(now), rows)
        with self._db.write() as conn:
            return {(s, e) for s, e in conn.exec_driver_sql(statement, params)}

    def _known(
        self, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, int | None, datetime]]:
        k = stream_ingress_keys.c
        found: dict[tuple[str, str], tuple[int, int | None, datetime]] = {}
        with self._db.read() as conn:
            for start in range(0, len(keys), _KEY_CHUNK // 2):
                chunk = keys[start : start + _KEY_CHUNK // 2]
                rows = conn.execute(
                    sa.select(k.source, k.event_id, k.fingerprint, k.seq, k.claimed_at).where(
                        sa.tuple_(k.source, k.event_id).in_(chunk)
                    )
                )
                for s, e, fp, seq, at in rows:
                    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
                    found[(s, e)] = (int(fp), None if seq is None else int(seq), at)
        return found

    def _confirm(self, seqs: dict[tuple[str, str], int]) -> None:
        """Note the acknowledged stream sequence of claimed keys (one statement)."""
        if not seqs:
            return
        rows = orjson.dumps([[s, e, q] for (s, e), q in seqs.items()]).decode()
        if self._db.backend == "postgresql":
            statement = CONFIRM_KEYS
        else:
            statement = (
                "UPDATE stream_ingress_keys SET seq = value->>2 FROM json_each(?) "
                "WHERE source = value->>0 AND event_id = value->>1"
            )
        with self._db.write() as conn:
            conn.exec_driver_sql(statement, (rows,))

    async def _publish(self, records: Sequence[IngressRecord]) -> list[tuple[int, bool]]:
        """Publish and wait for every ack: (stream sequence, duplicate) per record."""
        if not records:
            return []
        nc = await self._client.nc()
        inbox = nc.new_inbox()
        acks: list[Any] = [None] * len(records)
        done = asyncio.get_running_loop().create_future()
        left = len(records)

        async def on_ack(msg: Msg) -> None:
            nonlocal left
            index = int(msg.subject.rsplit(".", 1)[1])
            if acks[index] is None:
                acks[index] = orjson.loads(msg.data)
                left -= 1
                if left == 0 and not done.done():
                    done.set_result(None)

        sub = await nc.subscribe(f"{inbox}.*", cb=on_ack, pending_msgs_limit=-1)
        try:
            for index, r in enumerate(records):
                await nc.publish(
                    self.subject(r.shard),
                    encode(r),
                    reply=f"{inbox}.{index}",
                    headers={"Nats-Msg-Id": msg_id(r.source, r.event_id)},
                )
            await nc.flush(int(_TIMEOUT))
            await asyncio.wait_for(done, _PUBLISH_TIMEOUT)
        finally:
            await sub.unsubscribe()
        result = []
        for ack in acks:
            if "error" in ack:
                raise JetStreamUnavailable(f"JetStream refused a message: {ack['error']}")
            result.append((int(ack["seq"]), bool(ack.get("duplicate", False))))
        return result

    def _find_published(
        self,
        records: Sequence[IngressRecord],
        known: dict[tuple[str, str], tuple[int, int | None, datetime]],
    ) -> dict[tuple[str, str], int]:
        """Of records whose claim is older than the duplicate window and was never
        confirmed, those whose message is in the stream: scanned per shard from the
        oldest claim on (a message is stored at most the publish timeout after its
        claim)."""
        found: dict[tuple[str, str], int] = {}
        by_shard: dict[int, list[IngressRecord]] = {}
        for r in records:
            by_shard.setdefault(r.shard, []).append(r)
        for shard, group in by_shard.items():
            wanted = {(r.source, r.event_id) for r in group}
            since = min(known[key][2] for key in wanted) - timedelta(seconds=1)
            until = max(known[key][2] for key in wanted) + timedelta(seconds=_PUBLISH_TIMEOUT * 3)
            found_here = self._client.run(
                self._scan(
                    shard,
                    since,
                    until,
                    keep=partial(_key_in, wanted),
                ),
                600,
            )
            for row, stored_at in found_here:
                if stored_at <= until:
                    found.setdefault((row.source, row.event_id), row.seq)
        return found

    # -- read --------------------------------------------------------------------------
    def read_after(
        self, shard: int, after: Position, limit: int, upto: Position | None = None
    ) -> list[StoredIngress]:
        """Messages of ``shard`` past ``after`` (and up to ``upto``), in stream order."""
        self.ensure_stream()
        last = upto[1] if upto is not None else 2**62
        with self._read_lock:
            try:
                return self._client.run(self._read(shard, after[1], limit, last))
            except JetStreamUnavailable:
                self._drop(shard)
                raise

    def _drop(self, shard: int) -> None:
        reader = self._readers.pop(shard, None)
        if reader is not None:
            self._client.loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self._close_reader(reader))
            )

    async def _close_reader(self, reader: _Reader) -> None:
        try:
            await reader.sub.unsubscribe()
            js = (await self._client.nc()).jetstream(timeout=_TIMEOUT)
            await js.delete_consumer(self.stream, reader.name)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # the consumer is in memory, AckNone and inactive: the server drops it soon
            log.debug("leaving consumer %s to expire: %r", reader.name, exc)

    async def _open(self, shard: int, after: int) -> _Reader:
        nc = await self._client.nc()
        js = nc.jetstream(timeout=_TIMEOUT)
        info = await js.add_consumer(
            self.stream,
            api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=after + 1,
                ack_policy=api.AckPolicy.NONE,
                filter_subject=self.subject(shard),
                inactive_threshold=300.0,
                mem_storage=True,
                max_waiting=16,
            ),
        )
        inbox = nc.new_inbox()
        reader = _Reader(info.name, inbox, None, after)

        async def on_msg(msg: Msg) -> None:
            # a status (404 no messages, 408 request done, or an error) ends the pull
            if not msg.data and msg.headers and "Status" in msg.headers:
                reader.received.append(msg)
                reader.ended.set()
                return
            reader.received.append(msg)
            if len(reader.received) >= reader.expect:
                reader.ended.set()  # all it asked for: the server sends no status then

        reader.sub = await nc.subscribe(
            inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        return reader

    async def _read(self, shard: int, after: int, limit: int, upto: int) -> list[StoredIngress]:
        reader = self._readers.get(shard)
        if reader is not None and after < reader.after:
            self._readers.pop(shard)
            await self._close_reader(reader)
            reader = None
        if reader is None:
            reader = self._readers[shard] = await self._open(shard, after)
        rows: list[StoredIngress] = []
        # what was delivered before and not returned yet (past ``upto`` then)
        keep = [r for r in reader.buffer if r.seq > after]
        reader.buffer = []
        for row in keep:
            if len(rows) < limit and row.seq <= upto:
                rows.append(row)
            else:
                reader.buffer.append(row)
        while len(rows) < limit and not reader.buffer and (not rows or rows[-1].seq < upto):
            got = await self._pull(reader, shard, min(_FETCH, limit - len(rows)))
            if not got:
                break
            for row in got:
                if row.seq <= after:
                    continue
                if len(rows) < limit and row.seq <= upto:
                    rows.append(row)
                else:
                    reader.buffer.append(row)
        reader.after = rows[-1].seq if rows else max(after, reader.after)
        return rows

    async def _pull(self, reader: _Reader, shard: int, batch: int) -> list[StoredIngress]:
        """One no-wait pull: what the consumer has now, up to ``batch`` messages (the
        server ends it with a status once it has sent what it has)."""
        nc = await self._client.nc()
        reader.received = []
        reader.expect = batch
        reader.ended.clear()
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{reader.name}",
            orjson.dumps({"batch": batch, "no_wait": True}),
            reply=reader.inbox,
        )
        try:
            await asyncio.wait_for(reader.ended.wait(), _TIMEOUT)
        except TimeoutError as exc:
            raise self._broken(shard, "no answer to a pull") from exc
        rows: list[StoredIngress] = []
        delivered = reader.delivered
        for msg in reader.received:
            if not msg.data and msg.headers and "Status" in msg.headers:
                status = msg.headers["Status"]
                if status in ("404", "408"):
                    break  # no more messages now / request done
                raise self._broken(shard, f"pull status {status}")
            stream_seq, consumer_seq = _sequences(msg)
            if consumer_seq != delivered + 1:
                raise self._broken(shard, "a delivery was skipped")
            delivered = consumer_seq
            rows.append(decode(stream_seq, shard, msg.data))
        reader.delivered = delivered
        reader.received = []
        return rows

    def _broken(self, shard: int, why: str) -> JetStreamUnavailable:
        reader = self._readers.pop(shard, None)
        if reader is not None:
            asyncio.ensure_future(self._close_reader(reader))
        return JetStreamUnavailable(f"shard {shard}: {why}; reading again from the checkpoint")

    async def _scan(
        self,
        shard: int,
        since: datetime | None,
        until: datetime | None,
        start_seq: int = 0,
        keep: Callable[[StoredIngress, datetime], bool] | None = None,
    ) -> list[tuple[StoredIngress, datetime]]:
        """The messages of ``shard`` stored from ``since`` (or from ``start_seq``) until
        one stored after ``until`` (or the end), with the time each was stored; only
        those ``keep`` accepts are held in memory."""
        nc = await self._client.nc()
        js = nc.jetstream(timeout=_TIMEOUT)
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            filter_subject=self.subject(shard),
            inactive_threshold=60.0,
            mem_storage=True,
        )
        if since is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = since.astimezone(UTC)
        elif start_seq:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start_seq
        else:
            config.deliver_policy = api.DeliverPolicy.ALL
        info = await js.add_consumer(self.stream, config)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=-1, pending_bytes_limit=-1)
        out: list[tuple[StoredIngress, datetime]] = []
        try:
            while True:
                await nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{info.name}",
                    orjson.dumps({"batch": _FETCH, "no_wait": True}),
                    reply=inbox,
                )
                got = 0
                while True:
                    msg = await sub.next_msg(timeout=_TIMEOUT)
                    if not msg.data and msg.headers and "Status" in msg.headers:
                        break
                    got += 1
                    meta = msg.metadata
                    stored_at = meta.timestamp
                    row = decode(meta.sequence.stream, shard, msg.data)
                    if keep is None or keep(row, stored_at):
                        out.append((row, stored_at))
                    if until is not None and stored_at > until:
                        return out
                    if got == _FETCH:
                        break
                if got < _FETCH:
                    return out
        finally:
            await sub.unsubscribe()
            try:
                await js.delete_consumer(self.stream, info.name)
            except nats.js.errors.NotFoundError:
                pass

    def read_day(
        self,
        day: date,
        shard: int,
        after: Position,
        limit: int,
        received_before: datetime | None = None,
    ) -> list[StoredIngress]:
        """Messages of ``shard`` that occurred on ``day`` past ``after`` (the rule dry
        run's read: a scan of the shard's subject)."""
        self.ensure_stream()

        def wanted(row: StoredIngress, stored_at: datetime) -> bool:
            return (
                row.seq > after[1]
                and row.occurred_at.astimezone(UTC).date() == day
                and (received_before is None or stored_at < received_before)
            )

        found = self._client.run(self._scan(shard, None, None, after[1] + 1, wanted), 600)
        return [row for row, _ in found][:limit]

    # -- the backlog ---------------------------------------------------------------------
    def pending_stats(self, positions: dict[int, Position]) -> tuple[int, datetime | None]:
        """Messages past each shard's checkpoint and when the oldest was stored."""
        self.ensure_stream()
        return self._client.run(self._pending(positions))

    async def _pending(self, positions: dict[int, Position]) -> tuple[int, datetime | None]:
        js = (await self._client.nc()).jetstream(timeout=_TIMEOUT)
        total, oldest = 0, None
        for shard in range(self.shard_count):
            after = positions.get(shard, (0, 0))[1]
            try:
                msg = await js.get_msg(
                    self.stream, seq=after + 1, subject=self.subject(shard), next=True
                )
            except nats.js.errors.NotFoundError:
                continue
            info = await js.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=after + 1,
                    ack_policy=api.AckPolicy.NONE,
                    filter_subject=self.subject(shard),
                    inactive_threshold=10.0,
                    mem_storage=True,
                ),
            )
            total += int(info.num_pending or 0)
            await js.delete_consumer(self.stream, info.name)
            stored = msg.time
            if stored is not None and (oldest is None or stored < oldest):
                oldest = stored
        return total, oldest

    # -- forget-me -----------------------------------------------------------------------
    def erase_member(self, user_id: str, before: datetime) -> int:
        """Delete the member's messages that occurred by ``before`` from the stream
        (JetStream's message delete, which overwrites the message in its block: secure
        erase) and their keys; returns how many. The member's shard is scanned."""
        self.ensure_stream()
        shard = shard_of(user_id, self.shard_count)
        found = self._client.run(
            self._scan(
                shard,
                None,
                None,
                keep=lambda row, _at: row.user_id == user_id and row.occurred_at <= before,
            ),
            3600,
        )
        gone = [row for row, _ in found]
        self._client.run(self._delete([row.seq for row in gone]), 3600)
        keys = [(row.source, row.event_id) for row in gone]
        k = stream_ingress_keys.c
        with self._db.write() as conn:
            for start in range(0, len(keys), _KEY_CHUNK // 2):
                conn.execute(
                    stream_ingress_keys.delete().where(
                        sa.tuple_(k.source, k.event_id).in_(keys[start : start + _KEY_CHUNK // 2])
                    )
                )
        return len(gone)

    async def _delete(self, seqs: Iterable[int]) -> None:
        js = (await self._client.nc()).jetstream(timeout=_TIMEOUT)
        for seq in seqs:
            try:
                await js.delete_msg(self.stream, seq)  # no_erase unset: overwritten
            except nats.js.errors.NotFoundError:
                pass  # gone already (max_age, or an earlier run)

    # -- retention -----------------------------------------------------------------------
    def hold(self, oldest_unprocessed: datetime | None, now: datetime) -> timedelta:
        """Keep every unprocessed message: the stream's max_age is raised past the
        oldest one (plus a day) when the configured age would reach it, and set back
        when the pipeline has caught up. Returns the max_age now in force."""
        info = self.info()
        configured = self.max_age
        wanted = configured
        if oldest_unprocessed is not None:
            needed = now - oldest_unprocessed + timedelta(days=1)
            wanted = max(configured, needed)
        current = timedelta(seconds=float(info.config.max_age or 0))
        if abs((current - wanted).total_seconds()) > 60 and (
            wanted > current or current > configured
        ):
            target = wanted if wanted > configured else configured

            async def update() -> None:
                js = (await self._client.nc()).jetstream(timeout=_TIMEOUT)
                config = info.config
                config.max_age = target.total_seconds()
                await js.update_stream(config)

            self._client.run(update())
            if target > configured:
                log.error(
                    "ingress stream %s: unprocessed events from %s would expire: "
                    "max_age held at %s (configured %s) until the pipeline catches up",
                    self.stream,
                    oldest_unprocessed,
                    target,
                    configured,
                )
            else:
                log.warning("ingress stream %s: max_age back to %s", self.stream, configured)
            return target
        return current

    def delete_keys_before(self, day: date) -> int:
        """Retention of the key table: the keys of days before ``day``."""
        with self._db.write() as conn:
            return int(
                conn.execute(
                    stream_ingress_keys.delete().where(stream_ingress_keys.c.day < day)
                ).rowcount
            )

    def close_readers(self) -> None:
        with self._read_lock:
            for shard in list(self._readers):
                self._drop(shard)


def close_client(url: str) -> None:
    """Close the process's connection to ``url`` (tests: before their server goes)."""
    with _Client._lock:
        found = _Client._clients.get(url)
    if found is not None:
        found.close()


def wait_for_stream(log_: JetStreamIngressLog, seconds: float) -> None:
    """Wait until the stream answers (tests and start-up)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            log_.info()
            return
        except JetStreamUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def jetstream_log(db: Database) -> JetStreamIngressLog:
    """The JetStream ingress log of ``db``'s settings (``ingress_url``, ``ingress_stream``;
    max_age: the retention window plus a day, like the database's day partitions)."""
    settings = db.settings
    return JetStreamIngressLog(
        db,
        settings.ingress_url,
        stream=settings.ingress_stream,
        shard_count=settings.shard_count,
        max_age=timedelta(days=settings.retention_days + 1),
        duplicate_window=timedelta(seconds=settings.ingress_duplicate_window_seconds),
    )
