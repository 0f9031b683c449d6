"""How the de-duplication keys' layout prices each ingested key (migration 0022's choice),
on scratch tables of a scratch database: recording a batch of 1,000 new keys into one
table keyed ``(source, event_id)``; into the newest of day partitions, with and without
the probe of every older day; and into a generation (one older generation probed).

    .venv/bin/python -m benchmarks.keys_layout [--keys-per-day 200000] [--days 7]

Prints milliseconds per 1,000 keys (the mean of the middle 20 of 30 batches) and the
ratio of each to the single table.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import psycopg

ADMIN = os.environ.get("LOYALTY_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
COLUMNS = "source varchar(128) NOT NULL, event_id varchar(128) NOT NULL, day date NOT NULL"
BATCH = "SELECT e->>0 AS source, e->>1 AS event_id FROM jsonb_array_elements(%s::text::jsonb) e"


def per_batch_ms(conn: psycopg.Connection, statement: str) -> float:
    times = []
    for b in range(30):
        rows = [["src", f"new-{b}-{i}-{random.random()}"] for i in range(1000)]
        data = str(rows).replace("'", '"')
        started = time.perf_counter()
        with conn.transaction():
            conn.execute(statement, (data,))
        times.append(time.perf_counter() - started)
    middle = sorted(times)[5:25]
    return sum(middle) / len(middle) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys-per-day", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()
    name = f"loyalty_bench_keys_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = ADMIN.rsplit("/", 1)[0] + "/" + name
        with psycopg.connect(url, autocommit=True) as conn:
            days, n = args.days, args.keys_per_day
            conn.execute(f"CREATE TABLE one ({COLUMNS}, PRIMARY KEY (source, event_id))")
            conn.execute(f"CREATE TABLE parts ({COLUMNS}) PARTITION BY RANGE (day)")
            for d in range(days + 1):
                conn.execute(
                    f"CREATE TABLE parts_{d} PARTITION OF parts FOR VALUES "
                    f"FROM (DATE '2030-01-01' + {d}) TO (DATE '2030-01-01' + {d + 1})"
                )
                conn.execute(f"CREATE UNIQUE INDEX ON parts_{d} (source, event_id)")
            fill = (
                "SELECT 'src', md5(random()::text), DATE '2030-01-01' + {d} "
                "FROM generate_series(1, {n})"
            )
            for d in range(days):
                for table in ("one", "parts"):
                    conn.execute(f"INSERT INTO {table} " + fill.format(d=d, n=n))
            conn.execute("VACUUM ANALYZE one")
            conn.execute("VACUUM ANALYZE parts")
            today = f"DATE '2030-01-01' + {days}"
            into = f"INSERT INTO {{}} SELECT source, event_id, {today} FROM n"

            def probed(older: str) -> str:
                return (
                    f"WITH n AS ({BATCH}), ins AS ({into.format(f'parts_{days}')}) "
                    "SELECT 1 / (CASE WHEN EXISTS (SELECT 1 FROM n JOIN parts k "
                    f"ON k.source = n.source AND k.event_id = n.event_id AND {older}) "
                    "THEN 0 ELSE 1 END)"
                )

            conn.execute("SET enable_hashjoin = off")
            conn.execute("SET enable_mergejoin = off")
            cases = {
                "one table": f"WITH n AS ({BATCH}) {into.format('one')}",
                "newest day partition only": f"WITH n AS ({BATCH}) " + into.format(f"parts_{days}"),
                f"day partition + {days} older days probed": probed(f"k.day < {today}"),
                "generation + 1 older probed": probed(f"k.day = {today} - 1"),
            }
            base = None
            for label, statement in cases.items():
                ms = per_batch_ms(conn, statement)
                base = base or ms
                print(f"{label:40} {ms:6.2f} ms per 1,000 keys  ({ms / base:.2f}x)")
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
