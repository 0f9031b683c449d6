"""The full schemathesis run against a live ``loyalty serve`` (``make fuzz``).

A fresh database (a temporary SQLite file, or a new PostgreSQL database dropped at the
end), ``loyalty migrate``, an operator key, ``loyalty serve`` with its worker children
(so forget-me requests are carried out while the fuzzer runs), one seeded member, then
``schemathesis run`` on ``/openapi.json`` with every phase (examples, coverage, fuzzing,
stateful) and the checks below. Afterwards the server's log is searched for 500s: each
must carry its request id and traceback.

    python -m tests.e2e.fuzz_live --backend sqlite --backend postgresql --workers 2
    python -m tests.e2e.fuzz_live --backend sqlite -- --exclude-path-regex forget

Exit status: 0 when every run passed and the server logged no 500.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from tests.e2e.live import LOYALTY, create_key, env_for, free_port, wait_healthy

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,negative_data_rejection"
)
PHASES = "examples,coverage,fuzzing,stateful"
PG_ADMIN_URL = os.environ.get("LOYALTY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


@dataclass
class Outcome:
    backend: str
    returncode: int
    seconds: float
    server_errors: list[str]
    output: str
    server_log: str


@contextmanager
def fresh_database(backend: str) -> Iterator[str]:
    """The URL of a new, empty database, removed afterwards."""
    if backend == "sqlite":
        directory = tempfile.mkdtemp(prefix="loyalty-fuzz-")
        try:
            yield f"sqlite:///{directory}/loyalty.db"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    name = f"loyalty_fuzz_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def server_errors(log: str) -> list[str]:
    """One line per traceback in the server's log: the exception it ended with."""
    errors: list[str] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        for after in lines[i + 1 :]:
            if after and not after.startswith((" ", "\t", "Traceback")):
                errors.append(after)
                break
    return errors


def run(
    backend: str,
    *,
    workers: int,
    phases: str = PHASES,
    max_examples: int | None = None,
    max_time: int | None = None,
    seed: int | None = None,
    extra: tuple[str, ...] = (),
) -> Outcome:
    """One schemathesis run against a live server on a fresh database of ``backend``."""
    with fresh_database(backend) as url, tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [*LOYALTY, "migrate"], env=env_for(url), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        key = create_key(url, "operator", "fuzz")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [*LOYALTY, "serve", "--port", str(port)],
                env=env_for(url),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            wait_healthy(server, base, log_path.read_text)
            headers = {"Authorization": f"Bearer {key}"}
            seed_member = {"adjustment_id": "a-0", "currency": 50, "rank_points": 5, "reason": "s"}
            httpx.post(
                f"{base}/v1/members/alice/adjustments", json=seed_member, headers=headers
            ).raise_for_status()
            command = [
                SCHEMATHESIS,
                "run",
                f"{base}/openapi.json",
                "--checks",
                CHECKS,
                "--phases",
                phases,
                "--workers",
                str(workers),
                "-H",
                f"Authorization: Bearer {key}",
                "--suppress-health-check",
                "all",
                "--report-dir",
                str(Path(tmp) / "report"),
                *extra,
            ]
            if max_examples is not None:
                command += ["--max-examples", str(max_examples)]
            if max_time is not None:
                command += ["--max-time", str(max_time)]
            if seed is not None:
                command += ["--seed", str(seed)]
            started = time.monotonic()
            fuzz = subprocess.run(command, capture_output=True, text=True, cwd=tmp)
            seconds = time.monotonic() - started
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        server_log = log_path.read_text()
        return Outcome(
            backend,
            fuzz.returncode,
            seconds,
            server_errors(server_log),
            fuzz.stdout + fuzz.stderr,
            server_log,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--phases", default=PHASES)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--max-time", type=int, default=None, help="seconds per backend")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per backend")
    parser.add_argument("--verbose", action="store_true", help="print the server log too")
    parser.add_argument("extra", nargs="*", help="after --: more schemathesis options")
    args = parser.parse_args(argv)
    failed = False
    for backend in args.backend or ["sqlite", "postgresql"]:
        for _ in range(args.repeat):
            outcome = run(
                backend,
                workers=args.workers,
                phases=args.phases,
                max_examples=args.max_examples,
                max_time=args.max_time,
                seed=args.seed,
                extra=tuple(args.extra),
            )
            verdict = (
                "passed" if outcome.returncode == 0 and not outcome.server_errors else "FAILED"
            )
            print(
                f"{backend}: schemathesis exit {outcome.returncode}, "
                f"{len(outcome.server_errors)} server 500s, {outcome.seconds:.0f} s: {verdict}",
                flush=True,
            )
            for error, count in Counter(outcome.server_errors).most_common():
                print(f"  {count} x {error}", flush=True)
            if verdict == "FAILED":
                failed = True
                print(outcome.output, flush=True)
                if args.verbose:
                    print("--- server log ---\n" + outcome.server_log, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
