"""The HTTP server's own limits, enforced at the protocol layer before any request
reaches the application (and so before any key check).

uvicorn (with httptools, its fast parser) enforces none of them: httptools gathers a
header of any size in memory before it reports it (a 120 MB header was read, and held
the event loop for seconds), takes any number of headers, and a connection that sends
half a request line and then nothing stays open for ever. uvicorn's h11 parser bounds
the header block but is several times slower, and has no read timeout either. So
``serve`` runs uvicorn with :class:`LimitedHttpToolsProtocol`, a small subclass of its
httptools protocol that adds:

- **header block size**: request line plus headers at most ``max_header_bytes``; a
  block still incomplete past that is refused after at most one more read of the
  socket (so memory per connection stays bounded), a complete one over it too: 431;
- **header count**: at most ``max_headers``: 431;
- **header-read timeout**: a request's line and headers must arrive within
  ``header_timeout`` seconds of its first byte (of the connection, for the first
  request): 408 and close. Between requests uvicorn's keep-alive timeout applies;
- **body-read timeout**: a request's body must arrive within ``body_timeout`` seconds
  of its headers: 408 (if no answer was started yet) and close. The clock runs from
  the headers whether or not the application has started reading (uvicorn stops
  reading a body the application has not asked for past 64 KiB); the 30 s default
  leaves a busy process ample room;
- **connection cap**: at most ``max_connections`` open connections per process; one
  more is answered 503 and closed at once (the descriptor is freed immediately).

A refusal writes a small problem+json response, half-closes the connection, stops
reading, and closes ``linger`` seconds later (a client still sending can read the
answer in the meantime, instead of meeting a reset at once).

The subclass hooks only uvicorn's parser callbacks, ``data_received`` and
``send_400_response``; it is pinned to the uvicorn range in ``pyproject.toml`` and
proven against real sockets by ``tests/e2e/test_http_limits.py``.
"""

from __future__ import annotations

import asyncio
import http
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from loyalty.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    linger: float = 1.0


class _Refused(Exception):
    """Stops the parser after a refusal (uvicorn then answers nothing more)."""


def _response(status: int, code: str, detail: str) -> bytes:
    body = orjson.dumps(
        {
            "type": "about:blank",
            "title": http.HTTPStatus(status).phrase,
            "status": status,
            "code": code,
            "detail": detail,
        }
    )
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, timeout and connection limits."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ------------------------------------------------------------------ helpers

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, status: int, code: str, detail: str, *, linger: bool = True) -> None:
        """Answer ``status`` (unless a response is under way), then close."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        transport = self.transport
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            transport.write(_response(status, code, detail))
        if cycle is not None and not cycle.response_complete:
            # the application, if it waits for the body, gets http.disconnect now, and
            # anything it sends is dropped (uvicorn's own handling of a lost client)
            cycle.disconnected = True
            cycle.message_event.set()
        if not linger:
            transport.close()
            return
        if transport.can_write_eof():
            transport.write_eof()
        transport.pause_reading()  # read nothing more
        self.loop.call_later(self.limits.linger, transport.close)

    def _header_timeout(self) -> None:
        self._timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined request waits behind one in progress: look again later
            self._arm(self.limits.header_timeout, self._header_timeout)
            return
        self._refuse(408, "header_timeout", "the request's headers took too long")

    def _body_timeout(self) -> None:
        self._timer = None
        self._refuse(408, "body_timeout", "the request's body took too long")

    # ------------------------------------------------------------ the protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection refused: %d open", len(self.connections) - 1)
            self._refuse(503, "too_many_connections", "try again later", linger=False)
            return
        self._arm(self.limits.header_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # discarded while lingering
        awaiting = self._awaiting_headers
        super().data_received(data)
        if self._refused or not awaiting or not self._awaiting_headers:
            return
        # the headers are still incomplete: what they took so far is bounded
        self._header_bytes += len(data)
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", self._too_large())

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal stopped the parser: it has answered already
            super().send_400_response(msg)

    def _too_large(self) -> str:
        limits = self.limits
        return f"at most {limits.max_headers} headers and {limits.max_header_bytes} bytes"

    # ------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_count = 0
        if self._timer is None:  # the next request on a kept-alive connection
            self._arm(self.limits.header_timeout, self._header_timeout)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refuse(431, "too_many_headers", self._too_large())
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", self._too_large())
            raise _Refused
        self._awaiting_headers = False
        self._arm(self.limits.body_timeout, self._body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def limited_protocol(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.run(http=...)`` enforcing ``limits``."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def http_limits(settings: Settings) -> HttpLimits:
    return HttpLimits(
        max_header_bytes=settings.http_max_header_bytes,
        max_headers=settings.http_max_headers,
        header_timeout=settings.http_header_timeout_seconds,
        body_timeout=settings.http_body_timeout_seconds,
        max_connections=settings.http_max_connections,
    )


SPARE_DESCRIPTORS = 256
"""Descriptors kept for everything but client connections (database, logs, workers)."""


def ensure_descriptors(max_connections: int) -> None:
    """Raise this process's soft open-file limit so that ``max_connections`` clients
    fit beside :data:`SPARE_DESCRIPTORS` others (up to the hard limit; a warning if
    even that is too low: then the connection cap would not be reached before
    accept() fails)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open-file limit %d is below LOYALTY_HTTP_MAX_CONNECTIONS + %d; "
            "raise it (ulimit -n) or lower the setting",
            soft,
            SPARE_DESCRIPTORS,
        )
