"""The tests' one helper module for live processes: run the real ``loyalty`` CLI and
server as subprocesses (``serve_logged``/``serve``), create keys, and wait for things
(``wait_for``, ``wait_for_output``, ``wait_healthy``) on events rather than sleeps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

LOYALTY = [sys.executable, "-m", "loyalty.cli"]
METRICS_TOKEN = "live-metrics-token"
"""``serve`` below exposes GET /metrics with this token (LOYALTY_METRICS_TOKEN)."""
METRICS_HEADERS = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    env.update({"LOYALTY_DATABASE_URL": database_url, **extra})
    return env


def cli(database_url: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOYALTY, *args],
        env=env_for(database_url),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,  # a guard against a hang, below pytest-timeout's 300 s per test; a
        # 1,500-member compensation took over 120 s with 4 workers on a loaded machine
    )


def create_key(database_url: str, role: str, name: str) -> str:
    """A new key of ``role`` in the database at ``database_url``, created in-process by the
    store ``loyalty keys create`` uses (a CLI process per key cost ~1.5 s of imports;
    tests/e2e/test_cli.py runs the command itself)."""
    from loyalty.adapters.db import Database
    from loyalty.adapters.keys import KeyStore, Role
    from loyalty.adapters.migrate import migrate
    from loyalty.config import Settings

    db = Database(Settings(database_url=database_url))
    try:
        migrate(db)  # as the command does (a no-op at head; safe beside a live server)
        return KeyStore(db).create(Role(role), name)
    finally:
        db.dispose()


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, what: str = "", interval: float = 0.05
) -> T:
    """Polls ``predicate`` until it returns something true and returns that; fails (an
    AssertionError naming ``what``) after ``timeout`` seconds. The tests' one wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def wait_for_output(output: Callable[[], str], text: str, timeout: float = 60.0) -> str:
    """Until ``text`` is in a process's ``output()`` so far; returns that output."""

    def has_text() -> str:
        found = output()
        return found if text in found else ""

    try:
        return wait_for(has_text, timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{text!r} not in the server's output:\n{output()}") from None


def wait_healthy(proc: subprocess.Popen[Any], base: str, output: Callable[[], str]) -> None:
    """Until ``base``/healthz answers 200; fails with the server's output if it exits,
    and after 60 s."""
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {output()}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("server did not answer /healthz within 60 s")
        time.sleep(0.1)


class Server:
    """A running ``loyalty serve``: its ``base`` URL, ``port``, process and output."""

    def __init__(self, proc: subprocess.Popen[str], port: int, url: str, log: Any) -> None:
        self.proc, self.port, self.url, self._log = proc, port, url, log
        self.base = f"http://127.0.0.1:{port}"
        self._final: str | None = None  # the whole output, once serve_process closed it

    def output(self) -> str:
        """Everything the server (and its worker children) wrote so far."""
        if self._final is not None:
            return self._final
        if isinstance(self._log, Path):
            return self._log.read_text()
        self._log.seek(0)
        return str(self._log.read())

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def serve_process(
    database_url: str,
    *args: str,
    cwd: Path | None = None,
    log: Path | None = None,
    healthy: bool = True,
    stop_timeout: float = 20,
    **extra: str,
) -> Iterator[Server]:
    """The tests' one way to start ``loyalty serve``: on a free port, ``args`` after
    ``serve`` (``--no-worker``, ...), ``extra`` more environment variables; its output goes
    to ``log`` (a file kept for the test) or a temporary file, never a pipe nobody reads
    (a chatty server would block on it). Yields once /healthz answers (``healthy``);
    stops the server (and its worker children) on the way out."""
    port = free_port()
    out = log.open("w") if log is not None else tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [*LOYALTY, "serve", "--port", str(port), *args],
        env=env_for(database_url, **extra),
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(proc, port, database_url, log if log is not None else out)
    try:
        if healthy:
            wait_healthy(proc, server.base, server.output)
        yield server
    finally:
        server.stop(stop_timeout)
        server._final = server.output()
        out.close()


@contextmanager
def serve_logged(
    database_url: str, *args: str, cwd: Path | None = None, **extra: str
) -> Iterator[tuple[str, Callable[[], str]]]:
    """``loyalty serve`` on a free port (``extra``: more environment variables) with
    GET /metrics behind METRICS_TOKEN; yields its base URL once /healthz answers, and a
    function returning its output so far."""
    with serve_process(
        database_url, *args, cwd=cwd, **{"LOYALTY_METRICS_TOKEN": METRICS_TOKEN, **extra}
    ) as server:
        yield server.base, server.output


@contextmanager
def serve(database_url: str, *args: str, cwd: Path | None = None) -> Iterator[str]:
    """``loyalty serve`` on a free port; yields its base URL once /healthz answers."""
    with serve_logged(database_url, *args, cwd=cwd) as (base, _output):
        yield base
