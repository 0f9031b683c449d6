"""Abuse guards of the API: security headers, body limits before parsing, duplicate JSON
keys, and a per-key rate limit on ingest (an in-process token bucket per key)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
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
"""Every response's policy, unless it set its own (``/docs`` does: see ``api/docs.py``)."""


class SecurityHeadersMiddleware:
    """Adds ``nosniff``, ``DENY`` framing, ``no-referrer``, ``Cache-Control: no-store``
    (unless the response set its own) and a restrictive Content-Security-Policy (unless
    the response set its own) to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                if b"content-security-policy" not in present:
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


class _Object(dict[str, Any]):
    """A parsed object that remembers the first key it repeats (if any)."""

    repeated: str | None = None


def _pairs_noting_repeats(pairs: list[tuple[str, Any]]) -> _Object:
    found = _Object(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                found.repeated = key
                break
            seen.add(key)
    return found


def _repeat_in(value: Any, path: str) -> str | None:
    if isinstance(value, _Object):
        if value.repeated is not None:
            return f"{path}.{value.repeated}" if path else value.repeated
        for key, item in value.items():
            found = _repeat_in(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _repeat_in(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def repeated_key_location(body: bytes) -> str:
    """Where the first repeated key of a JSON ``body`` is, as a field location
    (``events[2].attributes.level``: the object's path, then the key), or ``body``
    when it cannot be told (not JSON, nesting too deep)."""
    try:
        document = json.loads(body, object_pairs_hook=_pairs_noting_repeats)
    except (ValueError, RecursionError):
        return "body"
    return _repeat_in(document, "") or "body"


def json_error_detail(message: str) -> str:
    """The 400 ``malformed_json`` detail: what the parser found, and where."""
    return f"the body is not valid JSON: {message}"


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
    """Cheap proof that a JSON ``body`` repeats no key, given ``keys``: at most the
    number of keys its parsed objects hold (a lower bound of the parser's view, never a
    count of the body's own text). Why it holds: in JSON a key is a string followed by
    optional white space and ``:``; its closing ``"`` is never escaped. If no ``"`` is
    followed by white space and then ``:`` anywhere in the body, every key of the
    document ends in its own occurrence of ``":``, so ``body.count(b'":') >= keys in
    the document >= keys parsed >= keys`` (a parser keeps one value per repeated key).
    Equality of the outer terms forces equality throughout: no key was repeated.
    Anything else that makes ``":`` (an escaped quote then a colon inside a string, a
    string starting with a colon), or a ``keys`` below the parsed count, only breaks
    the equality, which withholds the proof and sends the caller to
    :func:`has_duplicate_keys` (the stdlib parser's pairs). Costs one scan of the body
    at memchr speed (compact JSON has no white space), or also one regex scan."""
    if body.count(_KEY_END) != keys:
        return False
    if not any(space in body for space in _WHITESPACE):
        return True
    return _KEY_THEN_WHITESPACE.search(body) is None


# -------------------------------------------------------------- request bodies (not ingress)

INGRESS_PATH = "/v1/ingress/batches"
"""Ingress reads its body itself (8 MiB, streamed, counted) and checks keys cheaply."""


def _problem(status: int, code: str, detail: str) -> tuple[int, bytes]:
    titles = {413: "Payload too large", 400: "Bad request"}
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
    it is over ``limit`` bytes (a header read costs nothing, so this comes before the
    key check), and with 400 when ``Content-Length`` is not a number. Nothing is read
    or parsed here: a route that takes a body reads it after the key check, counted
    (:func:`read_limited_body`), and parses it with :func:`parse_json_document`."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == INGRESS_PATH:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    await self._answer(send, *_problem(400, "bad_content_length", "bad length"))
                    return
                if int(value) > self.limit:
                    detail = f"a request body may have at most {self.limit} bytes"
                    await self._answer(send, *_problem(413, "body_too_large", detail))
                    return
                break
        await self.app(scope, receive, send)

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


class BodyProblem(ValueError):
    """A request body refused before validation: ``status`` 400, 413 or 415 (or 422
    ``duplicate_key``), with a stable ``code``."""

    def __init__(self, status: int, code: str, detail: str, loc: str = "body") -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.loc = loc  # where (a duplicate_key's repeated key)


def check_json_content_type(headers: Mapping[str, str]) -> None:
    """415 unless ``Content-Type`` is ``application/json`` (parameters allowed) and the
    body is not compressed."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise BodyProblem(415, "unsupported_media_type", "send Content-Type: application/json")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BodyProblem(415, "unsupported_content_encoding", "send an uncompressed body")


async def read_limited_body(
    headers: Mapping[str, str], stream: AsyncIterator[bytes], limit: int, code: str
) -> bytes:
    """The request body, refused with 413 ``code`` as soon as it exceeds ``limit``
    bytes (by ``Content-Length``, or counted while it streams in)."""
    too_large = BodyProblem(413, code, f"a request body may have at most {limit} bytes")
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BodyProblem(400, "bad_content_length", "Content-Length must be a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_document(body: bytes) -> Any:
    """The JSON document ``body`` as the stdlib parser reads it, every object seen as
    its list of (key, value) pairs: 422 ``duplicate_key`` if one repeats a key, 400
    ``malformed_json`` if it is not JSON (or nests too deeply to parse)."""
    try:
        return json.loads(body, object_pairs_hook=_pairs_without_duplicates)
    except DuplicateKey:
        loc = repeated_key_location(body)
        detail = f"an object in the body repeats a key: {loc}"
        raise BodyProblem(422, "duplicate_key", detail, loc) from None
    except RecursionError:
        raise BodyProblem(400, "malformed_json", "the body nests too deeply") from None
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise BodyProblem(400, "malformed_json", json_error_detail(where)) from exc
    except ValueError as exc:  # e.g. not UTF-8
        raise BodyProblem(400, "malformed_json", json_error_detail(str(exc))) from exc


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
