"""Run the real ``loyalty`` CLI and server as subprocesses."""

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
from typing import Any

import httpx

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
        timeout=120,
    )


def create_key(database_url: str, role: str, name: str) -> str:
    done = cli(database_url, "keys", "create", "--role", role, "--name", name)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


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


@contextmanager
def serve_logged(
    database_url: str, *args: str, cwd: Path | None = None, **extra: str
) -> Iterator[tuple[str, Callable[[], str]]]:
    """``loyalty serve`` on a free port (``extra``: more environment variables); yields its
    base URL once /healthz answers, and a function returning its output so far."""
    port = free_port()
    # output to a file, not a pipe nobody reads (a chatty server would block on it)
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [*LOYALTY, "serve", "--port", str(port), *args],
        env=env_for(database_url, **{"LOYALTY_METRICS_TOKEN": METRICS_TOKEN, **extra}),
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.seek(0)
        return log.read()

    try:
        wait_healthy(proc, base, output)
        yield base, output
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def serve(database_url: str, *args: str, cwd: Path | None = None) -> Iterator[str]:
    """``loyalty serve`` on a free port; yields its base URL once /healthz answers."""
    with serve_logged(database_url, *args, cwd=cwd) as (base, _output):
        yield base
