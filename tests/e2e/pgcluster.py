"""A throwaway PostgreSQL cluster owned by one test: ``initdb`` + ``pg_ctl`` on a free port
in a temporary directory, so that a test may stop, restart or reconfigure it (never the
shared server). As root, the cluster runs as the ``postgres`` user (initdb refuses root).
``initdb`` runs once per test process (xdist worker): each cluster copies that data
directory (``cp -a``, a few ms) instead of running initdb again (about 2 s)."""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.e2e.live import free_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> float:
    try:
        return float(path.split("/")[4])
    except (IndexError, ValueError):
        return 0.0


_template: Path | None = None
"""The data directory initdb made for this process, copied by every Cluster."""


def _as_postgres(directory: Path) -> list[str]:
    """The command prefix that runs a tool as the owner of the clusters: ``postgres`` when
    we are root (initdb refuses root; ``directory`` is given to it), else nothing."""
    if os.geteuid() != 0:
        return []
    user = pwd.getpwnam("postgres")
    os.chown(directory, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


def template_data(bindir: Path) -> Path:
    """A fresh data directory (initdb), made once per process and removed at its exit."""
    global _template
    if _template is None:
        where = Path(tempfile.mkdtemp(prefix="loyalty-pg-template-"))
        atexit.register(shutil.rmtree, where, ignore_errors=True)
        subprocess.run(
            [*_as_postgres(where), str(bindir / "initdb"), "-D", str(where / "data")]
            + ["-A", "trust", "-U", "postgres", "--no-sync"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            cwd=where,
        )
        _template = where / "data"
    return _template


class Cluster:
    """``start()``, ``stop()``, ``url(db)``, ``create_database(name)``, ``destroy()``."""

    def __init__(self, max_connections: int = 60) -> None:
        self.max_connections = max_connections
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql")
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="loyalty-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as = _as_postgres(self.dir)
        subprocess.run(
            [*self._as, "cp", "-a", str(template_data(bindir)), str(self.data)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as, str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
            cwd=self.dir,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c max_connections={self.max_connections} -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
