"""CPU seconds of process trees and of PostgreSQL backends, read from /proc (Linux).

Used to say what bounds a benchmark: CPU in our Python processes, in PostgreSQL, or in
the load generator, against the 2 cores' capacity over the same wall-clock time.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import psycopg

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _own_cpu(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out.extend(int(c) for c in text)
    except OSError:
        pass
    return out


def tree(pids: list[int]) -> list[int]:
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def snapshot(pids: list[int]) -> dict[int, float]:
    return {pid: _own_cpu(pid) for pid in pids}


def delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())


def postgres_pids(admin_url: str, dbname: str) -> list[int]:
    """Backends of ``dbname`` plus the shared WAL writer, checkpointer, bgwriter."""
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE (datname = %s AND pid <> "
                "pg_backend_pid()) OR backend_type IN "
                "('walwriter', 'checkpointer', 'background writer')",
                (dbname,),
            ).fetchall()
    except psycopg.Error:
        return []
    return [r[0] for r in rows]


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


class WaitSampler:
    """Samples what the database's active backends wait on, every ``interval`` s."""

    def __init__(self, admin_url: str, dbname: str, interval: float = 0.05) -> None:
        self._args = (admin_url, dbname)
        self._interval = interval
        self._stop = threading.Event()
        self._counts: collections.Counter[str] = collections.Counter()
        self._samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        admin_url, dbname = self._args
        try:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                for _ in range(20 * 60 * 30):  # bounded: at most 30 min at 20/s
                    if self._stop.wait(self._interval):
                        return
                    rows = conn.execute(
                        "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') "
                        "FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                        "AND pid <> pg_backend_pid()",
                        (dbname,),
                    ).fetchall()
                    self._samples += 1
                    self._counts.update(r[0] for r in rows)
        except psycopg.Error:
            return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Average number of backends in each state (CPU = running, not waiting)."""
        self._stop.set()
        self._thread.join(timeout=5)
        n = max(self._samples, 1)
        return {k: round(v / n, 2) for k, v in self._counts.most_common(6)}


class CpuMeter:
    """CPU seconds spent by named groups between :meth:`start` and :meth:`stop`, plus
    ``other``: what the rest of the machine used meanwhile (noise from other work)."""

    def __init__(
        self, trees: dict[str, list[int]], admin_url: str | None, dbname: str | None
    ) -> None:
        self._trees = trees
        self._pg = (admin_url, dbname) if admin_url and dbname else None
        self._before: dict[str, dict[int, float]] = {}
        self._machine = 0.0
        self.waits = WaitSampler(admin_url, dbname) if admin_url and dbname else None

    def _sample(self) -> dict[str, dict[int, float]]:
        out = {name: snapshot(tree(pids)) for name, pids in self._trees.items()}
        if self._pg is not None:
            out["postgres"] = snapshot(postgres_pids(*self._pg))
        return out

    def start(self) -> None:
        self._before = self._sample()
        self._machine = machine_busy()
        if self.waits is not None:
            self.waits.start()

    def stop(self, own: float = 0.0) -> dict[str, float]:
        """Per group; ``own`` is the caller's own CPU, counted as not ``other``."""
        machine = machine_busy() - self._machine
        after = self._sample()
        out = {name: delta(self._before.get(name, {}), a) for name, a in after.items()}
        out["other"] = max(0.0, machine - sum(out.values()) - own)
        return out

    def pg_waits(self) -> dict[str, float]:
        return self.waits.stop() if self.waits is not None else {}
