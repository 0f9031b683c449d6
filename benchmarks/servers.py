"""Real API server processes for benchmarks, on free ports of 127.0.0.1.

``uvicorn``: N separate ``uvicorn --factory`` processes, one port each (``uvicorn
--workers N`` shares one socket and was seen to put all long-lived keep-alive
connections on one worker). ``granian``: one granian with N workers on one port.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

APP = "loyalty.api.app:create_app_from_env"
SERVERS = ("uvicorn", "granian")


@dataclass(frozen=True)
class Running:
    kind: str
    ports: list[int]
    pids: list[int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(database_url: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    env["LOYALTY_DATABASE_URL"] = database_url
    env.update(extra or {})
    return env


def _command(kind: str, port: int, workers: int) -> list[str]:
    if kind == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            APP,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            # what `loyalty serve` runs: httptools with the edge limits
            "loyalty.api.http_server:LimitedHttpToolsProtocol",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    if kind == "granian":
        return [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--no-access-log",
            "--log-level",
            "warning",
            APP,
        ]
    raise ValueError(f"unknown server kind {kind!r}; one of {SERVERS}")


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@contextmanager
def serve(
    database_url: str,
    *,
    kind: str = "uvicorn",
    processes: int = 2,
    env: dict[str, str] | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[Running]:
    """Start the API (``processes`` of it), wait for /healthz, stop it afterwards."""
    if kind == "uvicorn":
        ports = [free_port() for _ in range(processes)]
        commands = [_command(kind, p, 1) for p in ports]
    else:
        ports = [free_port()]
        commands = [_command(kind, ports[0], processes)]
    logs = [tempfile.TemporaryFile() for _ in commands]  # a pipe nobody reads could block
    procs = [
        subprocess.Popen(cmd, env=_env(database_url, env), stdout=log, stderr=subprocess.STDOUT)
        for cmd, log in zip(commands, logs, strict=True)
    ]
    try:
        deadline = time.monotonic() + startup_timeout
        pending = set(ports)
        while pending:
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"{kind} exited with {proc.returncode}: {err[-2000:]}")
            pending = {p for p in pending if not _healthy(p)}
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not answer /healthz in {startup_timeout} s")
            if pending:
                time.sleep(0.1)
        if kind == "granian":  # wait a moment for every worker to be up
            time.sleep(1.0)
        yield Running(kind, ports, [p.pid for p in procs])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in logs:
            log.close()
