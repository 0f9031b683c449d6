"""A small benchmark framework: a registry, a per-run context, JSON lines, a chart.

Every figure is a ratio against a baseline measured *in the same run* (absolute times
on a 2-core box with PostgreSQL beside it are noisy).

Adding a benchmark
------------------
Write a function that takes the :class:`Context` and returns one dict, register it with
:func:`benchmark`, and import its module in ``benchmarks/run.py`` (``MODULES``)::

    from benchmarks.framework import Context, benchmark

    @benchmark("member_read", order=40)
    def member_read(ctx: Context) -> dict[str, object]:
        n = ctx.pick(smoke=500, quick=20_000, full=200_000)  # size by mode
        url = ctx.pg_url                              # this run's fresh, migrated database
        key = ctx.create_key(Role.SHOP, "bench-shop") # a key (lk_...) for that database
        ...                                           # load from a separate process
        return {
            "name": "member_read", "value": reqs_per_s, "unit": "req/s",
            "baseline": "trivial_read", "baseline_value": base_per_s,
            "p99_ms": p99,                            # extra keys are kept
            "target": "ratio >= 0.7 and p99_ms <= 10",  # optional, checked and reported
        }

``ratio`` is filled in as ``value / baseline_value`` when absent. ``target`` is a Python
expression over the result's keys; the framework adds ``"met": true|false``.

Three modes: ``smoke`` (tiny sizes, about a minute for every benchmark: CI runs it,
``tests/e2e/test_benchmarks_smoke.py``, so that a benchmark cannot break unnoticed; its
figures mean nothing and no target is judged), ``quick`` and ``full``. Every ``pick``
names a smoke size: one without it fails the smoke run.

Helpers on :class:`Context`: ``pick(smoke=, quick=, full=)``, ``pg_url`` (one fresh PostgreSQL
database per run, migrated, dropped at the end), ``new_pg_database(label)`` (another
such database, for a benchmark that needs data of its own), ``create_key``, ``memo(key, fn)`` to
share an expensive measurement between benchmarks, ``result_of(name)`` to use another
benchmark's result as a baseline (it is run first if it has not been), ``tmp_dir``.
Benchmarks run in ``order``; ``--only a,b`` runs just those (plus what they ask for).
A benchmark that raises is reported as ``{"name", "error"}`` and the run goes on.

Rules for load: traffic only to 127.0.0.1, from a separate process, and every loop
bounded both in count and in time (see ``benchmarks.loadgen``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import psycopg

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.migrate import migrate
from loyalty.application.access import Role
from loyalty.config import Settings

Mode = Literal["smoke", "quick", "full"]
Result = dict[str, Any]
BenchFn = Callable[["Context"], Result]
T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PG_ADMIN_URL = os.environ.get(
    "LOYALTY_BENCH_PG",
    os.environ.get("LOYALTY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
)


@dataclass(frozen=True)
class Registered:
    name: str
    fn: BenchFn
    order: int
    description: str


REGISTRY: dict[str, Registered] = {}


def benchmark(name: str, *, order: int = 100) -> Callable[[BenchFn], BenchFn]:
    """Register ``fn`` as the benchmark ``name`` (run in ascending ``order``)."""

    def register(fn: BenchFn) -> BenchFn:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Registered(name, fn, order, doc[0] if doc else "")
        return fn

    return register


def admin(sql: str, url: str = PG_ADMIN_URL) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def pg_url_for(name: str, admin_url: str = PG_ADMIN_URL) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


@dataclass
class Context:
    mode: Mode
    admin_url: str = PG_ADMIN_URL
    results: dict[str, Result] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict)
    _running: set[str] = field(default_factory=set)
    _pg_name: str | None = None
    _tmp: Path | None = None
    _db: Database | None = None
    _extra_dbs: list[str] = field(default_factory=list)
    _template: str | None = None

    # -- sizing ----------------------------------------------------------------------
    def pick(self, *, quick: T, full: T, smoke: T | None = None) -> T:
        """The size for this run's mode; ``smoke`` is required in a smoke run."""
        if self.mode == "smoke":
            if smoke is None:
                raise TypeError("this benchmark has no smoke size: pass pick(smoke=...)")
            return smoke
        return quick if self.mode == "quick" else full

    # -- storage ---------------------------------------------------------------------
    def _migrated_copy(self, name: str) -> str:
        """``CREATE DATABASE name`` from this run's migrated template (migrated once, on
        first use: a copy is a file copy, a migration runs every script)."""
        if self._template is None:
            template = f"loyalty_bench_{os.getpid()}_tmpl_{uuid.uuid4().hex[:6]}"
            admin(f'CREATE DATABASE "{template}"', self.admin_url)
            self._template = template
            db = Database(Settings(database_url=pg_url_for(template, self.admin_url)))
            try:
                migrate(db)
            finally:
                db.dispose()
        admin(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"', self.admin_url)
        return pg_url_for(name, self.admin_url)

    @property
    def pg_url(self) -> str:
        """This run's PostgreSQL database: created and migrated on first use."""
        if self._pg_name is None:
            name = f"loyalty_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            self._migrated_copy(name)
            self._pg_name = name
        return pg_url_for(self._pg_name, self.admin_url)

    def new_pg_database(self, label: str) -> str:
        """Another fresh, migrated PostgreSQL database for this run (dropped at the end),
        for a benchmark that needs data of its own; returns its URL."""
        name = f"loyalty_bench_{os.getpid()}_{label}_{uuid.uuid4().hex[:6]}"
        self._extra_dbs.append(name)
        return self._migrated_copy(name)

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(Settings(database_url=self.pg_url, db_pool_size=2))
        return self._db

    @property
    def tmp_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="loyalty-bench-"))
        return self._tmp

    def create_key(self, role: Role, name: str, database_url: str | None = None) -> str:
        if database_url is None:
            return KeyStore(self.db).create(role, name)
        db = Database(Settings(database_url=database_url, db_pool_size=1))
        try:
            return KeyStore(db).create(role, name)
        finally:
            db.dispose()

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
        if self._pg_name is not None:
            admin(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)', self.admin_url)
            self._pg_name = None
        while self._extra_dbs:
            name = self._extra_dbs.pop()
            admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', self.admin_url)
        if self._template is not None:
            admin(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)', self.admin_url)
            self._template = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- sharing ---------------------------------------------------------------------
    def memo(self, key: str, fn: Callable[[], T]) -> T:
        if key not in self._memo:
            try:
                self._memo[key] = (True, fn())
            except Exception as exc:  # remembered: a second caller does not redo it
                self._memo[key] = (False, exc)
        ok, value = self._memo[key]
        if not ok:
            raise RuntimeError(f"{key} failed earlier: {value}")
        result: T = value
        return result

    def result_of(self, name: str) -> Result:
        if name not in self.results:
            if name in self._running:
                raise RuntimeError(f"benchmark {name!r} depends on itself")
            self.run_one(name)
        result = self.results[name]
        if "error" in result:
            raise RuntimeError(f"{name} failed: {result['error']}")
        return result

    def run_one(self, name: str) -> Result:
        if name in self.results:
            return self.results[name]
        self._running.add(name)
        started = time.monotonic()
        try:
            result = finish(REGISTRY[name].fn(self), name, self.mode)
        except Exception as exc:  # report and go on with the next benchmark
            traceback.print_exc(file=sys.stderr)
            result = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            self._running.discard(name)
        result.setdefault("seconds", round(time.monotonic() - started, 1))
        self.results[name] = result
        print(json.dumps(result), flush=True)
        return result


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4 if abs(value) < 10 else 1)
    return value


def finish(result: Result, name: str, mode: Mode = "quick") -> Result:
    """Fill in ratio and target check; keep the five contract keys first."""
    result = dict(result)
    result.setdefault("name", name)
    value, base = result.get("value"), result.get("baseline_value")
    if "ratio" not in result:
        result["ratio"] = value / base if value is not None and base else None
    target = result.get("target")
    if mode == "smoke":  # tiny sizes: the figures mean nothing, no target is judged
        result.pop("target", None)
    elif target:
        try:
            result["met"] = bool(eval(target, {}, dict(result)))  # noqa: S307 - our own text
        except Exception as exc:
            result["met"] = f"cannot evaluate: {exc}"
    head = ["name", "value", "unit", "baseline", "baseline_value", "ratio"]
    ordered = {k: _round(result.get(k)) for k in head}
    ordered.update({k: _round(v) for k, v in result.items() if k not in head})
    return ordered


@contextmanager
def timer() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


# -- output ------------------------------------------------------------------------
def write_results(results: list[Result], mode: Mode, path: Path | None = None) -> Path:
    path = path or RESULTS_DIR / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "mode": mode,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def write_chart(results: list[Result], path: Path | None = None) -> Path:
    """One horizontal bar per benchmark: its ratio to the same-run baseline (a figure
    without a baseline is listed with its value and target, without a bar)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the chart needs matplotlib: pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or RESULTS_DIR / "latest.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(11, 0.7 * max(len(rows), 2) + 1.4))
    names = [r["name"] for r in rows]
    # A figure without a same-run baseline (end_to_end_lag) gets no bar, only its label.
    ratios = [float(r["ratio"]) if isinstance(r.get("ratio"), int | float) else 0.0 for r in rows]
    colors = [
        "tab:green" if r.get("met") is True else "tab:red" if r.get("met") is False else "tab:blue"
        for r in rows
    ]
    ax.barh(names, ratios, color=colors)
    ax.invert_yaxis()
    shown = [x for x in ratios if x > 0]
    if shown and max(shown) / max(min(shown), 1e-9) > 50:
        ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    for i, r in enumerate(rows):
        value = r.get("value")
        if isinstance(value, int | float):
            text = f"{value:,.{1 if isinstance(value, float) and abs(value) < 100 else 0}f}"
        else:  # a benchmark of several figures (delivery): its line in the JSON has them
            text = "figures in latest.json"
        if ratios[i] > 0:
            label = (
                f"  {text} {r.get('unit') or ''} vs {r.get('baseline')} "
                f"{r['baseline_value']:,.0f}  (x{ratios[i]:.2f})"
            )
        else:
            label = f"  {text} {r.get('unit') or ''} (no baseline; target: {r.get('target', '-')})"
        if r.get("met") is not None:
            label += "  met" if r.get("met") is True else "  MISSED"
        ax.text(
            ratios[i] if ratios[i] > 0 else (min(shown) if shown else 1.0),
            i,
            label,
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("ratio to the same-run baseline (green: target met, red: missed)")
    ax.set_title("loyalty benchmarks")
    ax.margins(x=1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
