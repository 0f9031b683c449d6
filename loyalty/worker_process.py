"""``loyalty serve``'s pipeline worker, as a child process it supervises.

On two cores one interpreter cannot both answer ingest at full rate and weigh what it
ingested (one GIL): the worker gets a process, and so a core, of its own. It is the
very ``loyalty worker`` an operator would run (same settings, from the environment),
started in its own session so a terminal's Ctrl-C reaches only ``serve``, which then
stops it. ``serve`` restarts it if it dies; it exits by itself if ``serve`` dies.

Its metrics (pipeline, projection, retention) are served by it on a loopback port and
merged into ``serve``'s ``GET /metrics`` by :class:`WorkerMetrics`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

# Families the worker process owns; serve reports its own for everything else.
WORKER_FAMILY_PREFIXES = ("loyalty_pipeline_", "loyalty_projection_", "loyalty_retention_")
RESTART_DELAY_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STOP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def owned_by_worker(family: str) -> bool:
    return family.startswith(WORKER_FAMILY_PREFIXES)


class WorkerProcess:
    """Start, watch, restart and stop one ``loyalty worker`` child."""

    def __init__(self, shards: str) -> None:
        self._shards = shards
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.restarts = 0
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def _spawn(self) -> None:
        port = _free_port()
        command = [
            sys.executable,
            "-m",
            "loyalty.cli",
            "worker",
            "--shards",
            self._shards,
            "--metrics-port",
            str(port),
            "--parent-pid",
            str(os.getpid()),
        ]
        with self._lock:
            self.metrics_port = port
            self._proc = subprocess.Popen(command, start_new_session=True)
        log.info("pipeline worker process %d started", self._proc.pid)

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            assert proc is not None
            started = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            # a worker that ran a while and died starts over at the shortest delay
            failures = 0 if time.monotonic() - started > 60 else failures + 1
            delay = RESTART_DELAY_S[min(failures, len(RESTART_DELAY_S) - 1)]
            log.warning("pipeline worker process exited with %s; restarting in %.1f s", code, delay)
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()

    def stop(self) -> None:
        """SIGTERM, then wait (it finishes its window); SIGKILL after the timeout."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "pipeline worker process did not stop in %.0f s; killing it", STOP_TIMEOUT_S
            )
            proc.kill()
            proc.wait()


class WorkerMetrics:
    """``serve``'s exposition: its own families, except those the worker owns, which come
    from the worker's last scrape (absent while the worker is restarting)."""

    def __init__(self, own: CollectorRegistry, worker: WorkerProcess) -> None:
        self._own = own
        self._worker = worker

    def _scrape(self) -> str:
        url = f"http://127.0.0.1:{self._worker.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback)
                return str(resp.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            log.debug("worker metrics unavailable: %s", exc)
            return ""

    def collect(self) -> Iterator[Metric]:
        for family in self._own.collect():
            if not owned_by_worker(family.name):
                yield family
        for family in text_string_to_metric_families(self._scrape()):
            if owned_by_worker(family.name):
                yield family


def merged_registry(own: CollectorRegistry, worker: WorkerProcess) -> CollectorRegistry:
    """A registry to expose instead of ``own`` while ``worker`` runs the pipeline."""
    merged = CollectorRegistry(auto_describe=False)
    merged.register(WorkerMetrics(own, worker))
    return merged
