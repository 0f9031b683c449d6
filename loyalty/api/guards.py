"""Abuse guards of the API: security headers, body limits before parsing, duplicate JSON
keys, and a per-key rate limit on ingest (an in-process token bucket per key)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBLEM_JSON = b"application/problem+json"

# --------------------------------------------------------------------- security headers

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_PATHS = ("/docs", "/redoc")
"""Swagger UI and ReDoc load scripts and styles: no restrictive CSP there."""


class SecurityHeadersMiddleware:
    """Adds ``nosniff``, ``DENY`` framing, ``no-referrer``, ``Cache-Control: no-store``
    (unless the response set its own) and a restrictive Content-Security-Policy (except
    on the interactive docs) to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = str(scope.get("path", "")).startswith(DOCS_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                if not docs and b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", CSP))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ------------------------------------------------------------------ duplicate JSON keys


class DuplicateKey(ValueError):
    """A JSON object names the same key twice."""


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise DuplicateKey("an object has the same key twice")
    return found


def has_duplicate_keys(body: bytes) -> bool:
    """True if some object of the JSON ``body`` repeats a key (RFC 8259 leaves such a
    document's meaning to each parser; we refuse it). False for anything that is not
    JSON: judging that is the parser's job. Slow (the stdlib parser): for small bodies,
    or when :func:`keys_counted` cannot vouch for a large one."""
    try:
        json.loads(body, object_pairs_hook=_pairs_without_duplicates)
    except DuplicateKey:
        return True
    except (ValueError, RecursionError):
        return False
    return False


_KEY_END = b'":'
_WHITESPACE = (b" ", b"\n", b"\r", b"\t")
_KEY_THEN_WHITESPACE = re.compile(rb'"[ \t\r\n]+:')


def keys_counted(body: bytes, keys: int) -> bool:
    """Cheap proof that a body which parsed into objects with ``keys`` keys in all holds
    no duplicate key: every key ends with ``":`` unless white space stands before its
    colon, so a duplicate (even one spelled with escapes) adds one more ``":`` than the
    parsed objects have keys. Strings may hold ``\\":`` too (then the counts differ and
    there is no proof), and a body with ``"`` + white space + ``:`` gets none either.
    Costs one scan of the body at memchr speed (compact JSON has no white space), or
    also one regex scan."""
    if body.count(_KEY_END) != keys:
        return False
    if not any(space in body for space in _WHITESPACE):
        return True
    return _KEY_THEN_WHITESPACE.search(body) is None


# -------------------------------------------------------------- request bodies (not ingress)

INGRESS_PATH = "/v1/ingress/batches"
"""Ingress reads its body itself (8 MiB, streamed, counted) and checks keys cheaply."""


def _problem(status: int, code: str, detail: str) -> tuple[int, bytes]:
    titles = {413: "Payload too large", 422: "Unprocessable content", 400: "Bad request"}
    body = {
        "type": "about:blank",
        "title": titles[status],
        "status": status,
        "code": code,
        "detail": detail,
    }
    return status, orjson.dumps(body)


class BodyGuardMiddleware:
    """Every request body except ingress': refused with 413 when ``Content-Length`` says
    it is over ``limit`` bytes, or as soon as the streamed bytes are (before anything
    parses it); a JSON body that repeats a key in an object is refused with 422
    (``duplicate_key``). The body is buffered here (at most ``limit`` bytes) and handed
    on unchanged."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == INGRESS_PATH:
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            headers = dict(scope.get("headers", ()))
            if b"content-length" not in headers and b"transfer-encoding" not in headers:
                await self.app(scope, receive, send)
                return
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = value
                break
        if declared is not None:
            if not declared.isdigit():
                await self._answer(send, *_problem(400, "bad_content_length", "bad length"))
                return
            if int(declared) > self.limit:
                await self._answer(send, *self._too_large())
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._answer(send, *self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body[:1] in (b"{", b"[") and has_duplicate_keys(body):
            await self._answer(
                send, *_problem(422, "duplicate_key", "an object in the body repeats a key")
            )
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> tuple[int, bytes]:
        return _problem(
            413, "body_too_large", f"a request body may have at most {self.limit} bytes"
        )

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", PROBLEM_JSON),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------ rate limit


class RateLimiter:
    """A token bucket per key: ``rate`` tokens (events) per second, at most ``burst``
    saved up. ``take(key, n)`` returns 0.0 when the events may pass (and spends the
    tokens), else the seconds until they could (and spends nothing). ``rate`` 0: off.
    Thread-safe; O(1) per call; the table of keys is bounded (idle full buckets are
    dropped when it grows)."""

    MAX_KEYS = 10_000

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, n: int) -> float:
        if self.rate <= 0 or n <= 0:
            return 0.0
        cost = min(float(n), self.burst)  # a batch over the burst waits for a full bucket
        now = self._clock()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.MAX_KEYS:
                self._forget_idle(now)
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if cost <= tokens:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
        return max((cost - tokens) / self.rate, 1e-6)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` has a token again (0.0: it has one); spends nothing."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            found = self._buckets.get(key)
        if found is None:
            return 0.0
        tokens = found[0] + (self._clock() - found[1]) * self.rate
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key, (_tokens, at) in list(self._buckets.items()):
            if now - at >= full_after:
                del self._buckets[key]

    @staticmethod
    def retry_after(seconds: float) -> str:
        """A ``Retry-After`` value: whole seconds, at least 1."""
        return str(max(1, math.ceil(seconds)))
