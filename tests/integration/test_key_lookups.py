"""Statements that look rows up by a JSON array of keys probe the table's primary key once
per key, whatever its statistics say, and the due rows are read through their index
(issue 30). A plain join of the array with the table
was planned as a hash join over a sequential scan while ``pipeline_pending`` held a few
thousand rows, and a pooled connection's cached generic plan kept that plan as the table
grew: a save's explanations took 15 ms at 40k pending rows and the pipeline over many
members ran at half its rate.

Real PostgreSQL: each statement as the server plans it, both as a cached generic plan and
as a custom plan, over tables of 5,000 analyzed rows (where such a join scans them)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from loyalty.adapters.db import Database
from loyalty.adapters.event_recorder import DELETE_RECORDED, EXPLAIN_RECORDED, NO_SUMMARY
from loyalty.adapters.expiry_store import REMOVE_LOTS
from loyalty.adapters.ingress_log import caps_partition_name, create_caps_partition
from loyalty.adapters.nats_log import CONFIRM_KEYS
from loyalty.adapters.pending_store import DUE, LOCK_PENDING, SET_NEEDS
from loyalty.adapters.pipeline_store import LOAD_CAPS
from loyalty.config import Settings
from tests.conftest import backends

ROWS = 5_000
USER = "u0000042"  # one of the rows
TODAY = datetime.now(UTC).date().isoformat()
YESTERDAY = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
CAPS = caps_partition_name(date.fromisoformat(TODAY))
CAPS_DAYS = [CAPS, caps_partition_name(date.fromisoformat(YESTERDAY))]
"""The caps of TODAY: a partition per day (migration 0023); YESTERDAY's is filled too."""

STATEMENTS: dict[str, tuple[str, str, tuple[Any, ...]]] = {
    # name: (statement, the table it looks up, its parameters)
    "explain recorded": (
        EXPLAIN_RECORDED,
        "pipeline_pending",
        (NO_SUMMARY, orjson.dumps([[USER, 42, 42, "w2.42.42", 1, 1, "0", "0"]]).decode()),
    ),
    "delete recorded": (
        DELETE_RECORDED,
        "pipeline_pending",
        (orjson.dumps([[USER, 42, 42]]).decode(), 1),
    ),
    "lock pending": (LOCK_PENDING, "pipeline_pending", (orjson.dumps([USER]).decode(),)),
    "set needs": (
        SET_NEEDS,
        "pipeline_pending",
        (orjson.dumps([[USER, 42, 42, "7"]]).decode(),),
    ),
    "load caps": (
        LOAD_CAPS,
        CAPS,
        (orjson.dumps([[USER, "logged_on", TODAY]]).decode(),),
    ),
    "remove lots": (REMOVE_LOTS, "member_lots", (orjson.dumps([["2026-01", USER]]).decode(),)),
    "confirm stream keys": (
        CONFIRM_KEYS,
        "stream_ingress_keys",
        (orjson.dumps([["s", "e42", 7]]).decode(),),
    ),
}


WHOLE_KEY = {"member_lots": {"member_lots_pkey", "member_lots_due_idx"}}
"""Indexes besides the primary key holding all of a table's key (``(lot, user_id)``: a
probe of one row too)."""


def primary_keys(table: str, used: list[str]) -> bool:
    """Whether ``used`` are primary keys of ``table``: the caps' plan names the primary key
    of every day's partition (run-time pruning probes one:
    ``test_a_caps_lookup_reads_only_its_days_partition``)."""
    if table == CAPS:
        return all(re.fullmatch(r"pipeline_caps_\d{8}_pkey", name) for name in used)
    return set(used) <= WHOLE_KEY.get(table, {f"{table}_pkey"})


def fill(conn: psycopg.Connection[Any]) -> None:
    """ROWS rows in each looked-up table, analyzed."""
    conn.execute(
        "INSERT INTO pipeline_pending (user_id, shard, currency, rank_points, event_count, "
        "rule_version, upto_txid, upto_seq, since, explain) "
        "SELECT 'u' || lpad(g::text, 7, '0'), mod(g, 16), '1.5', '1', 3, 1, g, g, now(), "
        "'{}' FROM generate_series(1, %s) g",
        (ROWS,),
    )
    conn.execute(
        "INSERT INTO pipeline_caps (user_id, event_type, day, shard, count) "
        "SELECT 'u' || lpad(g::text, 7, '0'), 'logged_on', d::date, mod(g, 16), 1 "
        "FROM generate_series(1, %s) g, unnest(ARRAY[%s, %s]) d",
        (ROWS, TODAY, YESTERDAY),
    )
    conn.execute(
        "INSERT INTO stream_ingress_keys (source, event_id, day, shard, fingerprint, "
        "claimed_at) SELECT 's', 'e' || g, current_date, mod(g, 16), g, now() "
        "FROM generate_series(1, %s) g",
        (ROWS,),
    )
    conn.execute(
        "INSERT INTO member_lots (user_id, lot) "
        "SELECT 'u' || lpad(g::text, 7, '0'), '2026-01' FROM generate_series(1, %s) g",
        (ROWS,),
    )
    conn.execute("ANALYZE pipeline_pending, pipeline_caps, stream_ingress_keys, member_lots")
    conn.execute(sql.SQL("ANALYZE {}, {}").format(*map(sql.Identifier, CAPS_DAYS)))


@pytest.fixture
def empty(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """The tables empty (``settings`` truncated them) and, as in a new deployment, never
    analyzed: what an earlier test's ANALYZE left in this session's database is taken
    back (the table sizes set to the catalog's "unknown", -1; the column statistics
    deleted)."""
    db = Database(settings)
    try:
        for day in (TODAY, YESTERDAY):
            create_caps_partition(db, date.fromisoformat(day))
    finally:
        db.dispose()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        tables = ["pipeline_pending", *CAPS_DAYS, "stream_ingress_keys", "member_lots"]
        conn.execute(
            "UPDATE pg_class SET reltuples = -1, relpages = 0 WHERE relname = ANY(%s)",
            (tables,),
        )
        conn.execute("DELETE FROM pg_statistic WHERE starelid = ANY(%s::regclass[])", (tables,))
        yield conn


@pytest.fixture
def filled(empty: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    fill(empty)
    return empty


def scans(plan: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(node type, relation) of every node of a JSON plan."""
    yield plan["Node Type"], plan.get("Relation Name", "")
    for child in plan.get("Plans", []):
        yield from scans(child)


def rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows the plan's scans of ``table`` produced (EXPLAIN ANALYZE)."""
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Relation Name") == table else 0
    return own + sum(rows_read(child, table) for child in plan.get("Plans", []))


def prepare(conn: psycopg.Connection[Any], statement: str) -> None:
    """``statement`` as the prepared statement ``lookup`` (``%s`` -> ``$n``)."""
    numbered = iter(range(1, 100))
    prepared = re.sub(r"%s", lambda _: f"${next(numbered)}", statement)
    conn.execute(f"PREPARE lookup AS {prepared}")  # type: ignore[arg-type]


def explained(conn: psycopg.Connection[Any], params: tuple[Any, ...], how: str) -> dict[str, Any]:
    """The plan of the prepared ``lookup`` (``how``: EXPLAIN options), deallocated."""
    try:
        values = sql.SQL(", ").join(sql.Literal(p) for p in params)
        row = conn.execute(
            sql.SQL("EXPLAIN ({}) EXECUTE lookup({})").format(sql.SQL(how), values)
        ).fetchone()
    finally:
        conn.execute("DEALLOCATE lookup")
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def indexes(plan: dict[str, Any]) -> Iterator[str]:
    """The indexes a plan scans."""
    if "Index Name" in plan:
        yield plan["Index Name"]
    for child in plan.get("Plans", []):
        yield from indexes(child)


@backends("postgresql")
@pytest.mark.parametrize("mode", ["force_generic_plan", "force_custom_plan"])
@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_a_lookup_by_keys_probes_the_primary_key_whatever_the_statistics(
    filled: psycopg.Connection[Any], name: str, mode: str
) -> None:
    statement, table, params = STATEMENTS[name]
    filled.execute(f"SET plan_cache_mode = {mode}")
    prepare(filled, statement)
    nodes = list(scans(explained(filled, params, "FORMAT JSON")))
    assert ("Seq Scan", table) not in nodes, nodes
    assert any(relation == table for _, relation in nodes), nodes  # it reads the table


@backends("postgresql")
@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_a_lookup_planned_on_empty_tables_still_probes_the_primary_key(
    empty: psycopg.Connection[Any], name: str
) -> None:
    """A new deployment: the generic plan a pooled connection caches is made while the
    tables are empty, and kept as they grow (nothing invalidates it without an ANALYZE).
    The caps' lookup chose the index on the day then (a tie on cost): every cap of the
    day read for each key."""
    statement, table, params = STATEMENTS[name]
    empty.execute("SET plan_cache_mode = force_generic_plan")
    prepare(empty, statement)
    used = list(indexes(explained(empty, params, "FORMAT JSON")))
    assert used and primary_keys(table, used), used


@backends("postgresql")
@pytest.mark.parametrize("mode", ["force_generic_plan", "force_custom_plan"])
def test_the_due_rows_are_read_no_more_than_returned(
    filled: psycopg.Connection[Any], mode: str
) -> None:
    """Every row is due; 100 are asked for: the index gives them in order, shard by
    shard (``shard IN (...) ORDER BY since`` read all 5,000 and sorted them; at 400k
    members 265 ms a call)."""
    filled.execute(f"SET plan_cache_mode = {mode}")
    params = (list(range(16)), datetime.now(UTC) + timedelta(hours=1), 100, 100)
    prepare(filled, DUE)
    plan = explained(filled, params, "ANALYZE, FORMAT JSON")
    assert plan["Actual Rows"] == 100
    assert rows_read(plan, "pipeline_pending") <= 100, plan


@backends("postgresql")
def test_the_due_rows_planned_on_an_empty_table_are_read_no_more_than_returned(
    empty: psycopg.Connection[Any],
) -> None:
    """The generic plan made while the table was empty, run once it holds 5,000 due
    rows."""
    empty.execute("SET plan_cache_mode = force_generic_plan")
    prepare(empty, DUE)
    fill(empty)
    params = (list(range(16)), datetime.now(UTC) + timedelta(hours=1), 100, 100)
    plan = explained(empty, params, "ANALYZE, FORMAT JSON")
    assert plan["Actual Rows"] == 100
    assert rows_read(plan, "pipeline_pending") <= 100, plan


@backends("postgresql")
@pytest.mark.parametrize("mode", ["force_generic_plan", "force_custom_plan"])
def test_a_caps_lookup_reads_only_its_days_partition(
    filled: psycopg.Connection[Any], mode: str
) -> None:
    """Migration 0023: a partition of caps per day. The key's day (a parameter of each
    probe) prunes the others at run time: yesterday's caps of the same member and type
    are not read, in a cached generic plan either."""
    filled.execute(f"SET plan_cache_mode = {mode}")
    prepare(filled, LOAD_CAPS)
    params = (orjson.dumps([[USER, "logged_on", TODAY]]).decode(),)
    plan = explained(filled, params, "ANALYZE, FORMAT JSON")
    assert plan["Actual Rows"] == 1
    assert rows_read(plan, CAPS) == 1
    assert probes(plan, CAPS_DAYS[1]) == 0, plan  # not even probed


def probes(plan: dict[str, Any], table: str) -> int:
    """How many times the plan's scans of ``table`` ran (EXPLAIN ANALYZE)."""
    own = plan["Actual Loops"] if plan.get("Relation Name") == table else 0
    return own + sum(probes(child, table) for child in plan.get("Plans", []))
