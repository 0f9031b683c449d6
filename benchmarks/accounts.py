"""Account benchmarks over the members the ``pipeline`` benchmark awarded (its database,
:mod:`benchmarks.pipeline_runs`): ``member_read`` and ``spend``, through real server
processes (2 uvicorn processes, as in ``ingest_http``) and a separate load process with 8
keep-alive clients.

- ``member_read``: ``GET /v1/members/{id}`` of random members. Baseline: the cheapest
  authenticated read of one row by primary key that answers 200, ``GET
  /v1/forget-requests/{id}`` of random completed requests (of members that never
  existed; ``BASELINE_ROWS`` of them): authentication, one primary-key lookup in
  ``forget_requests``, a small receipt. Both sides with the same operator key (an
  operator key may act as a shop), so authentication costs both the same. (``GET
  /v1/rules`` reads a cached rule set, no row; the 404 of an unknown request raises and
  renders problem+json, slower than the route measured.) Interleaved, best of two each.
- ``spend``: ``POST /v1/members/{id}/spend`` of 1 with a new order id, over members
  funded first by ``POST .../adjustments`` (operator key). Baseline: ``member_read``.
"""

from __future__ import annotations

from typing import Any

from benchmarks import reqload, servers
from benchmarks.fill import dbname
from benchmarks.framework import Context, Result, benchmark
from benchmarks.ingest_load import SERVER, per_core_note
from benchmarks.pipeline_runs import pipeline_run
from loyalty.adapters.db import Database
from loyalty.application.access import Role
from loyalty.config import Settings

CLIENTS = 8
BASELINE_ROWS = 64


def forget_receipts(url: str, n: int) -> list[str]:
    """``n`` completed forget requests (of members that never existed): their ids."""
    from loyalty.bootstrap import build_forget_service

    db = Database(Settings(database_url=url, db_pool_size=1))
    try:
        service = build_forget_service(db)
        ids = [service.request(f"bench-gone-{i:04d}").request_id for i in range(n)]
        service.run_pending()
        done = [service.status(i) for i in ids]
        unfinished = [
            i for i, r in zip(ids, done, strict=True) if r is None or r.completed_at is None
        ]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} forget requests did not complete")
        return ids
    finally:
        db.dispose()


def _spec(ctx: Context, url: str, running: servers.Running, **kw: Any) -> reqload.ReqSpec:
    return reqload.ReqSpec(
        ports=running.ports,
        clients=CLIENTS,
        watch={"server": running.pids},
        pg_admin_url=ctx.admin_url,
        pg_dbname=dbname(url),
        **kw,
    )


def _note(got: dict[str, Any]) -> dict[str, Any]:
    return per_core_note(got["cpu_s"], got["elapsed_s"], max(got["requests"], 1))


def reads(ctx: Context) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        m = pipeline_run(ctx)
        url, users = m["url"], m["users"]
        ops = ctx.create_key(Role.OPERATOR, "bench-ops", database_url=url)
        receipts = forget_receipts(url, ctx.pick(smoke=4, quick=BASELINE_ROWS, full=BASELINE_ROWS))
        seconds = ctx.pick(smoke=0.5, quick=3.0, full=10.0)
        best: dict[str, dict[str, Any]] = {}
        with servers.serve(url, kind=SERVER, processes=2) as running:
            # alternated twice, the best of each kept (one round at smoke size: it runs)
            phases = ("trivial", "member") * ctx.pick(smoke=1, quick=2, full=2)
            for i, phase in enumerate(phases):
                spec = _spec(
                    ctx,
                    url,
                    running,
                    key=ops,
                    kind="forget" if phase == "trivial" else "member",
                    users=users,
                    ids=tuple(receipts),
                    time_limit=seconds,
                    warmup_s=ctx.pick(smoke=0.2, quick=1.0, full=1.0) if i < 2 else 0.3,
                    seed=i + 1,
                )
                got = reqload.run_in_process(spec)
                if phase not in best or got["rate"] > best[phase]["rate"]:
                    best[phase] = got
        return best

    return ctx.memo("accounts.reads", measure)


@benchmark("member_read", order=40)
def member_read(ctx: Context) -> Result:
    """GET /v1/members/{id}, random members, 8 clients, vs an authenticated PK read."""
    r = reads(ctx)
    member, trivial = r["member"], r["trivial"]
    return {
        "value": member["rate"],
        "unit": "req/s",
        "baseline": "trivial_read",
        "baseline_value": trivial["rate"],
        "baseline_route": (
            "GET /v1/forget-requests/{id} of completed requests "
            "(auth + 1 PK read, 200), the same operator key on both sides"
        ),
        "requests": member["requests"],
        "errors": member["errors"],
        "p50_ms": member["p50_ms"],
        "p99_ms": member["p99_ms"],
        "baseline_p50_ms": trivial["p50_ms"],
        "baseline_p99_ms": trivial["p99_ms"],
        "members": pipeline_run(ctx)["users"],
        "server": f"{SERVER} x2",
        **_note(member),
        "pg_waits": member["pg_waits"],
        "first_error": member["first_error"],
        "target": "ratio >= 0.7 and p99_ms <= 10 and errors == 0",
    }


@benchmark("spend", order=50)
def spend(ctx: Context) -> Result:
    """POST /v1/members/{id}/spend across many funded members, vs member_read."""
    m = pipeline_run(ctx)
    url = m["url"]
    funded = min(m["users"], ctx.pick(smoke=50, quick=1_000, full=5_000))
    shop = ctx.create_key(Role.SHOP, "bench-spend", database_url=url)
    ops = ctx.create_key(Role.OPERATOR, "bench-fund", database_url=url)
    with servers.serve(url, kind=SERVER, processes=2) as running:
        fund = reqload.run_in_process(
            _spec(ctx, url, running, key=ops, kind="fund", users=funded, time_limit=120.0, tag="f")
        )
        if fund["errors"] or fund["requests"] != funded:
            raise RuntimeError(f"funding failed: {fund['first_error']} ({fund['requests']})")
        got = reqload.run_in_process(
            _spec(
                ctx,
                url,
                running,
                key=shop,
                kind="spend",
                users=funded,
                time_limit=ctx.pick(smoke=0.5, quick=4.0, full=10.0),
                warmup_s=ctx.pick(smoke=0.2, quick=1.0, full=1.0),
                tag="o",
            )
        )
    read = ctx.result_of("member_read")
    return {
        "value": got["rate"],
        "unit": "spends/s",
        "baseline": "member_read",
        "baseline_value": read["value"],
        "spends": got["requests"],
        "errors": got["errors"],
        "statuses": got["statuses"],
        "p50_ms": got["p50_ms"],
        "p99_ms": got["p99_ms"],
        "members": funded,
        "funding_rate": fund["rate"],
        "server": f"{SERVER} x2",
        **_note(got),
        "pg_waits": got["pg_waits"],
        "first_error": got["first_error"],
        "target": "errors == 0",
    }
