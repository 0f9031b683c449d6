"""``loyalty serve``'s workers, as child processes it supervises.

One interpreter (one GIL) cannot answer ingest at full rate, weigh what it ingested and
project the accounts into the read models: measured, the read models alone took a fifth
of a shared worker's interpreter, and moving them out cut the end-to-end lag's p99 from
5.7 s to 3.4 s. So ``serve`` starts the very ``loyalty worker`` an operator would run,
twice: the pipeline (with retention and forget-me) and the read models, each in its own
session so a terminal's Ctrl-C reaches only ``serve``, which then stops them. ``serve``
restarts a child that dies; a child exits by itself if ``serve`` dies.

Each child serves its metrics on a loopback port; :class:`WorkerMetrics` merges the
families each one owns into ``serve``'s metrics (``LOYALTY_METRICS_PORT`` or the
token-protected ``GET /metrics``).
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

# Both children run background jobs: their ``loyalty_job_*`` samples are merged, each
# labelled with the child (``worker``) so that a job both run (webhooks) stays two series.
SHARED_FAMILIES = ("loyalty_job_",)
PIPELINE_FAMILIES = ("loyalty_pipeline_", "loyalty_retention_", *SHARED_FAMILIES)
PROJECTION_FAMILIES = ("loyalty_projection_", *SHARED_FAMILIES)
RESTART_DELAY_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STOP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """Start, watch, restart and stop one ``loyalty worker`` child."""

    def __init__(self, name: str, args: list[str], owns: tuple[str, ...]) -> None:
        self.name = name
        # its connections say which child they belong to in pg_stat_activity
        parent = os.environ.get("LOYALTY_DB_APPLICATION_NAME", "loyalty")
        self.env = {**os.environ, "LOYALTY_DB_APPLICATION_NAME": f"{parent}-{name}"[:60]}
        self.owns = owns
        self._args = args
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
            *self._args,
            "--metrics-port",
            str(port),
            "--parent-pid",
            str(os.getpid()),
        ]
        with self._lock:
            self.metrics_port = port
            self._proc = subprocess.Popen(command, start_new_session=True, env=self.env)
        log.info("%s worker process %d started", self.name, self._proc.pid)

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
            log.warning(
                "%s worker process exited with %s; restarting in %.1f s", self.name, code, delay
            )
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
                "%s worker process did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_S
            )
            proc.kill()
            proc.wait()


def worker_children(shards: str) -> list[WorkerProcess]:
    """serve's two children: the pipeline on ``shards``, and the read models."""
    return [
        WorkerProcess("pipeline", ["--shards", shards, "--no-projections"], PIPELINE_FAMILIES),
        WorkerProcess("read-model", ["--no-pipeline"], PROJECTION_FAMILIES),
    ]


class WorkerMetrics:
    """``serve``'s exposition: its own families, except those a child owns, which come
    from that child's scrape (absent while it is restarting)."""

    def __init__(self, own: CollectorRegistry, children: list[WorkerProcess]) -> None:
        self._own = own
        self._children = children
        self._owned = tuple(prefix for child in children for prefix in child.owns)

    @staticmethod
    def _scrape(child: WorkerProcess) -> str:
        url = f"http://127.0.0.1:{child.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback)
                return str(resp.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            log.debug("%s worker metrics unavailable: %s", child.name, exc)
            return ""

    def collect(self) -> Iterator[Metric]:
        for family in self._own.collect():
            if not family.name.startswith(self._owned):
                yield family
        shared: dict[str, Metric] = {}
        for child in self._children:
            for family in text_string_to_metric_families(self._scrape(child)):
                if not family.name.startswith(child.owns):
                    continue
                if not family.name.startswith(SHARED_FAMILIES):
                    yield family
                    continue
                merged = shared.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                merged.samples.extend(
                    s._replace(labels={**s.labels, "worker": child.name}) for s in family.samples
                )
        yield from shared.values()


def merged_registry(own: CollectorRegistry, children: list[WorkerProcess]) -> CollectorRegistry:
    """A registry to expose instead of ``own`` while ``children`` run the workers."""
    merged = CollectorRegistry(auto_describe=False)
    merged.register(WorkerMetrics(own, children))
    return merged
