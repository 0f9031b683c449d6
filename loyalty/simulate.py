"""``loyalty simulate``: a load generator that posts realistic activity to a running
service.

A few event types in a fixed mix, attributes that the default rules care about
(``result``, ``tier``), and skewed user activity: user ``k`` (1-based rank) is picked with
weight ``1 / k**s`` (Zipf-like), so a few members are very active and most are not.
Each batch is built from its own seeded random generator, so a run with ``--seed`` sends
the same users, types and event ids again (a second run with the same seed is all
duplicates); timestamps are always "now".

Bounded by ``events`` (and optionally ``duration``); it talks only to the given URL.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import secrets
import threading
import time
import urllib.parse
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
EVENT_MIX: tuple[tuple[str, int], ...] = (
    ("logged_on", 30),
    ("played_game", 50),
    ("joined_competition", 5),
    ("made_purchase", 15),
)
GAMES = ("chess", "poker", "sudoku", "tetris", "trivia")
DEVICES = ("web", "ios", "android")
MAX_RETRIES = 6


class SimulationError(Exception):
    """The run cannot go on (refused key, unreachable service, a request it rejects)."""

    exit_code = 1


class BadSimulationConfig(SimulationError):
    """The options do not make a run."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    url: str = DEFAULT_URL
    key: str = ""
    users: int = 1000
    events: int = 10_000
    batch_size: int = 500
    rate: float = 0.0
    """Events per second to aim at; 0 means as fast as the service answers."""
    seed: int | None = None
    duration: float | None = None
    """Stop starting new batches after this many seconds."""
    concurrency: int = 2
    zipf_s: float = 1.1
    timeout: float = 60.0

    def validate(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BadSimulationConfig(f"--url must be http(s)://host[:port], not {self.url!r}")
        if min(self.users, self.events, self.batch_size, self.concurrency) < 1:
            raise BadSimulationConfig(
                "--users, --events, --batch-size and --concurrency must be >= 1"
            )
        if self.rate < 0 or (self.duration is not None and self.duration <= 0):
            raise BadSimulationConfig("--rate must be >= 0 and --duration > 0")
        if not self.key:
            raise BadSimulationConfig("--key is required (an ingest key)")


@dataclass(slots=True)
class SimulationResult:
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    retries: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class EventFactory:
    """Builds batches of realistic events; batch ``n`` is a pure function of the seed
    (or run id), ``n`` and the clock."""

    def __init__(self, users: int, run_id: str, zipf_s: float = 1.1) -> None:
        self.run_id = run_id
        self.users = users
        self._cum_weights = list(itertools.accumulate(1.0 / k**zipf_s for k in range(1, users + 1)))
        self._types = [t for t, _ in EVENT_MIX]
        self._type_cum = list(itertools.accumulate(w for _, w in EVENT_MIX))

    def user(self, rnd: random.Random) -> str:
        pick = rnd.random() * self._cum_weights[-1]
        return f"sim-user-{min(bisect_left(self._cum_weights, pick), self.users - 1):06d}"

    def event_type(self, rnd: random.Random) -> str:
        pick = rnd.random() * self._type_cum[-1]
        return self._types[bisect_left(self._type_cum, pick)]

    @staticmethod
    def attributes(event_type: str, rnd: random.Random) -> dict[str, Any]:
        if event_type == "played_game":
            return {"game": rnd.choice(GAMES), "result": "win" if rnd.random() < 0.3 else "loss"}
        if event_type == "made_purchase":
            tier = "premium" if rnd.random() < 0.2 else "standard"
            return {"tier": tier, "items": rnd.randint(1, 5)}
        if event_type == "joined_competition":
            return {"competition": f"cup-{rnd.randrange(20)}"}
        return {"device": rnd.choice(DEVICES)}

    def batch(self, number: int, first_event: int, size: int, now: datetime) -> dict[str, Any]:
        rnd = random.Random(f"{self.run_id}:{number}")
        events = []
        for i in range(first_event, first_event + size):
            event_type = self.event_type(rnd)
            occurred = now - timedelta(milliseconds=rnd.randrange(30_000))
            events.append(
                {
                    "event_id": f"{self.run_id}-{i}",
                    "user_id": self.user(rnd),
                    "type": event_type,
                    "occurred_at": occurred.isoformat(timespec="milliseconds").replace(
                        "+00:00", "Z"
                    ),
                    "attributes": self.attributes(event_type, rnd),
                }
            )
        return {"batch_id": f"{self.run_id}-b{number}", "events": events}


class _Client:
    """One keep-alive connection to the service."""

    def __init__(self, url: str, key: str, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port
        self._path = parsed.path.rstrip("/") + "/v1/ingress/batches"
        self._timeout = timeout
        self._headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "User-Agent": "loyalty-simulate",
        }
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout)
        try:
            self._conn.request("POST", self._path, body=body, headers=self._headers)
            response = self._conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.getheader("connection", "").lower() == "close":
            self.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _problem_summary(status: int, body: bytes) -> str:
    try:
        problem = json.loads(body)
        detail = problem.get("detail") or problem.get("title") or ""
        return f"HTTP {status} {problem.get('code', '')}: {detail}".strip()
    except (ValueError, AttributeError):
        return f"HTTP {status}"


class Simulation:
    def __init__(
        self,
        config: SimulationConfig,
        *,
        on_progress: Callable[[int], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        config.validate()
        self.config = config
        run_id = f"sim{config.seed}" if config.seed is not None else f"sim{secrets.token_hex(4)}"
        self.factory = EventFactory(config.users, run_id, config.zipf_s)
        self.on_progress = on_progress or (lambda _n: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._error: SimulationError | None = None
        self._reached = False
        self.result = SimulationResult()
        self._started = 0.0

    @property
    def batch_count(self) -> int:
        return -(-self.config.events // self.config.batch_size)

    def _claim(self) -> int | None:
        """The next batch number to send, once its time has come (None: done)."""
        cfg = self.config
        with self._lock:
            number = self._next
            if number >= self.batch_count:
                return None
            self._next += 1
        if cfg.rate > 0:
            due = self._started + number * cfg.batch_size / cfg.rate
            while not self._stop.is_set() and (wait := due - time.monotonic()) > 0:
                self._stop.wait(min(wait, 0.5))
        if self._stop.is_set():
            return None
        if cfg.duration is not None and time.monotonic() - self._started >= cfg.duration:
            return None
        return number

    def _send(self, client: _Client, number: int) -> None:
        cfg = self.config
        first = number * cfg.batch_size
        size = min(cfg.batch_size, cfg.events - first)
        body = json.dumps(self.factory.batch(number, first, size, self._clock())).encode()
        for attempt in range(MAX_RETRIES + 1):
            if self._stop.is_set():
                return
            try:
                status, headers, data = client.post(body)
            except (OSError, http.client.HTTPException) as exc:
                # Retry a connection that worked before (a restart, an overloaded
                # server); a service that never answered is reported at once.
                if attempt == MAX_RETRIES or not self._reached:
                    raise SimulationError(f"cannot reach {cfg.url}: {exc}") from None
                self._retry_wait(attempt, None)
                continue
            self._reached = True
            with self._lock:
                self.result.statuses[status] = self.result.statuses.get(status, 0) + 1
            if status == 202:
                answer = json.loads(data)
                with self._lock:
                    self.result.sent += size
                    self.result.batches += 1
                    self.result.accepted += int(answer["accepted"])
                    self.result.duplicates += int(answer["duplicates"])
                    self.result.rejected += len(answer["rejected"])
                self.on_progress(size)
                return
            if status in (429, 502, 503, 504) and attempt < MAX_RETRIES:
                self._retry_wait(attempt, headers.get("retry-after"))
                continue
            if status in (401, 403):
                raise SimulationError(
                    f"the service refused the key ({_problem_summary(status, data)})"
                )
            raise SimulationError(f"batch {number} refused: {_problem_summary(status, data)}")

    def _retry_wait(self, attempt: int, retry_after: str | None) -> None:
        with self._lock:
            self.result.retries += 1
        delay = min(5.0, 0.2 * 2**attempt)
        if retry_after is not None and retry_after.isdigit():
            delay = min(5.0, float(retry_after))
        self._stop.wait(delay)

    def _work(self) -> None:
        client = _Client(self.config.url, self.config.key, self.config.timeout)
        try:
            while (number := self._claim()) is not None:
                self._send(client, number)
        except SimulationError as exc:
            with self._lock:
                self._error = self._error or exc
            self._stop.set()
        finally:
            client.close()

    def run(self) -> SimulationResult:
        """Send every batch (with ``concurrency`` connections); raises SimulationError
        when the run had to stop."""
        self._started = time.monotonic()
        threads = [
            threading.Thread(target=self._work, name=f"simulate-{i}", daemon=True)
            for i in range(min(self.config.concurrency, self.batch_count))
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self._stop.set()
            for t in threads:
                t.join(self.config.timeout)
            raise
        finally:
            self.result.seconds = time.monotonic() - self._started
        if self._error is not None:
            raise self._error
        return self.result

    def stop(self) -> None:
        self._stop.set()
