"""The server's own limits, against a real ``loyalty serve`` process and real sockets:
oversized and too many headers (431, read no further, memory bounded), slow senders
(408 after the header or body timeout), the connection cap (503), and unauthenticated
bodies answered 401 before they are read; other clients' latency stays low meanwhile.

The limits are protocol-level (one code path for both backends): SQLite only."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.e2e.live import create_key, serve_process

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 300

pytestmark = pytest.mark.serial  # latency and elapsed-time bounds: one at a time


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int, url: str) -> None:
        self.proc = proc
        self.port = port
        self.url = url
        self.base = f"http://127.0.0.1:{port}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("limits") / "loyalty.db"
    with serve_process(
        f"sqlite:///{path}",
        "--no-worker",
        stop_timeout=15,
        LOYALTY_HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        LOYALTY_HTTP_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        LOYALTY_HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    ) as live:
        yield Server(live.proc, live.port, live.url)


def answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes. A server that neither sends nor
    closes for ``timeout`` seconds (a hung server) fails the test."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"no answer and no close within {timeout} s: {data[:200]!r}") from None
    return data


def status(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split(b" ", 2)[1])


def flood(sock: socket.socket, chunks: Iterator[bytes], sent: list[int]) -> None:
    """Send until the server stops reading (then the socket errors)."""
    try:
        for chunk in chunks:
            sock.sendall(chunk)
            sent[0] += len(chunk)
    except OSError:
        pass


class Latency:
    """Times /healthz on a fresh connection each time, in a thread, until stopped
    (raw sockets: an HTTP client library's own set-up would dominate the figure).

    A probe that gets no answer within ``timeout`` seconds, or not a 200, fails the test
    (raised again in the test's thread on leaving the ``with`` block); the block lasts
    until at least ``MIN_SAMPLES`` probes were answered, and p99 needs them."""

    MIN_SAMPLES = 20

    def __init__(self, base: str, timeout: float = 5.0) -> None:
        self.base = base
        self.timeout = timeout
        self.samples: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        host, port = self.base.removeprefix("http://").split(":")
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                with socket.create_connection((host, int(port)), timeout=self.timeout) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = answer(sock, timeout=self.timeout)
                assert status(data) == 200, data[:200]
                self.samples.append(time.perf_counter() - started)
                time.sleep(0.01)
        except BaseException as exc:  # handed to the test's thread by __exit__
            self.error = exc

    def __enter__(self) -> Latency:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        # every probe is bounded by the timeout: this ends, answered or failed
        while len(self.samples) < self.MIN_SAMPLES and self._thread.is_alive():
            time.sleep(0.01)
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise AssertionError(f"latency probe failed: {self.error!r}") from self.error

    def p99(self) -> float:
        assert len(self.samples) >= self.MIN_SAMPLES, f"too few probes answered: {self.samples}"
        return statistics.quantiles(self.samples, n=100)[98]


def test_a_120_mb_header_is_refused_unread(server: Server) -> None:
    sock = server.connect()
    sent = [0]

    def chunks() -> Iterator[bytes]:
        yield b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
        for _ in range(120 * 16):
            yield b"a" * 65536

    with Latency(server.base) as latency:
        started = time.monotonic()
        sender = threading.Thread(target=flood, args=(sock, chunks(), sent), daemon=True)
        sender.start()
        data = answer(sock)
        elapsed = time.monotonic() - started
        sender.join(timeout=10)
        time.sleep(0.3)
    assert status(data) == 431 and b"headers_too_large" in data
    assert elapsed < 3, elapsed
    assert sent[0] < 20 * 1024 * 1024, sent[0]  # read no further than a few socket reads
    assert latency.p99() < 0.5, latency.samples


def test_millions_of_small_headers_are_refused_with_bounded_memory(server: Server) -> None:
    before = server.rss_mb()
    socks = [server.connect() for _ in range(4)]
    sent = [[0] for _ in socks]

    def chunks() -> Iterator[bytes]:
        yield b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        block = b"".join(b"x-h%d: v\r\n" % i for i in range(5000))
        for _ in range(400):  # 2 million headers
            yield block

    senders = [
        threading.Thread(target=flood, args=(s, chunks(), n), daemon=True)
        for s, n in zip(socks, sent, strict=True)
    ]
    with Latency(server.base) as latency:
        for sender in senders:
            sender.start()
        answers = [answer(s) for s in socks]
        for sender in senders:
            sender.join(timeout=10)
    assert all(status(a) == 431 for a in answers), [a[:100] for a in answers]
    assert all(n[0] < 10 * 1024 * 1024 for n in sent), sent
    assert server.rss_mb() - before < 40, (before, server.rss_mb())
    assert latency.p99() < 0.5, latency.samples
    # many headers in few bytes: the count limit
    sock = server.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\n" + b"a: b\r\n" * 101 + b"\r\n")
    assert status(answer(sock)) == 431
    sock = server.connect()  # 99 headers: answered (and closed, as asked)
    sock.sendall(b"GET /healthz HTTP/1.1\r\n" + b"a: b\r\n" * 98 + b"Connection: close\r\n\r\n")
    assert status(answer(sock, timeout=2)) == 200


def test_slow_senders_are_cut_off_after_the_header_timeout(server: Server) -> None:
    socks = []
    for i in range(200):
        sock = server.connect()
        sock.sendall(b"GET /hea" if i % 2 else b"")  # half a request line, or nothing
        socks.append(sock)
    with Latency(server.base) as latency:
        time.sleep(HEADER_TIMEOUT + 1.0)
    started = time.monotonic()
    answers = [answer(s, timeout=3) for s in socks]
    assert time.monotonic() - started < 3  # every one was closed already
    assert all(a == b"" or status(a) == 408 for a in answers)
    assert sum(1 for a in answers if a) >= 100  # those that started a request got a 408
    assert latency.p99() < 0.5, latency.samples
    # a slow body: 10 of 100 bytes, then nothing
    sock = server.connect()
    sock.sendall(
        b"POST /v1/forget-requests HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n0123456789"
    )
    started = time.monotonic()
    data = answer(sock)
    assert status(data) in (401, 408)  # 401 at once (no key), then closed when the body stalls
    assert BODY_TIMEOUT - 0.5 < time.monotonic() - started < BODY_TIMEOUT + 2


def test_the_connection_cap_answers_503_and_frees_the_descriptor(server: Server) -> None:
    socks = [server.connect() for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    extra = server.connect()
    assert status(answer(extra, timeout=2)) == 503
    for sock in socks:
        sock.close()
    time.sleep(0.3)
    assert httpx.get(server.base + "/healthz", timeout=5).status_code == 200


def test_unauthenticated_bodies_are_answered_before_they_are_read(server: Server) -> None:
    # headers only, promising a 1 MiB body that never comes: 401 at once
    sock = server.connect()
    sock.sendall(
        b"POST /v1/members/u/spend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1048000\r\n\r\n"
    )
    sock.settimeout(BODY_TIMEOUT / 2)  # the answer comes before the body timeout
    head = b""
    while b"missing_api_key" not in head:
        head += sock.recv(65536)
    assert status(head) == 401
    sock.close()
    # four clients sending 1 MiB bodies without a key, in a loop: others barely notice
    body = b'{"order_id": "' + b"x" * (1024 * 1024 - 100) + b'"}'
    stop = threading.Event()

    request = (
        b"POST /v1/members/u/spend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body

    def hammer() -> list[int]:  # raw sockets: the sending costs this process no GIL time
        """The status of every answer (a reset, the server having closed on the unread
        body, is no answer; a hang fails)."""
        statuses = []
        while not stop.is_set():
            with server.connect() as sock:
                try:
                    sock.sendall(request)
                except OSError:
                    pass  # answered and closed before the body was all sent
                data = answer(sock, timeout=5)
                if data:
                    statuses.append(status(data))
        return statuses

    with ThreadPoolExecutor(4) as pool, Latency(server.base) as latency:
        hammers = [pool.submit(hammer) for _ in range(4)]
        try:
            time.sleep(3)
        finally:
            stop.set()
        statuses = [s for h in hammers for s in h.result(timeout=30)]  # re-raises their errors
    assert len(statuses) > 20 and set(statuses) == {401}, statuses
    assert statistics.median(latency.samples) < 0.05, latency.samples
    assert latency.p99() < 0.5, latency.samples


def test_a_user_id_with_percent_signs_is_addressed_by_its_escapes(server: Server) -> None:
    key = create_key(server.url, "operator", "ops")
    user_id = "a%ff?b #\u00e9"
    path = "/v1/members/" + quote(user_id, safe="")
    sock = server.connect()
    body = b'{"adjustment_id":"p1","currency":3,"rank_points":0,"reason":"r"}'
    sock.sendall(
        f"POST {path}/adjustments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    data = answer(sock)
    assert status(data) == 200, data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["user_id"] == user_id
