"""Account benchmarks over the members the ``pipeline`` benchmark awarded (its database):
``member_read`` and ``spend``, through real server processes (2 uvicorn processes, as in
``ingest_http``) and a separate load process with 8 keep-alive clients.

- ``member_read``: ``GET /v1/members/{id}`` of random members (shop key). Baseline: the
  cheapest authenticated read by primary key, ``GET /v1/forget-requests/{unknown id}``
  (operator key): authentication, one primary-key lookup in ``forget_requests``, 404.
  (``GET /v1/rules`` reads a cached rule set, no row.) Interleaved, best of two each.
- ``spend``: ``POST /v1/members/{id}/spend`` of 1 with a new order id, over members
  funded first by ``POST .../adjustments`` (operator key). Baseline: ``member_read``.
"""

from __future__ import annotations

from typing import Any

from benchmarks import ingest, reqload, servers
from benchmarks.earn import dbname, pipeline_db
from benchmarks.framework import Context, Result, benchmark
from loyalty.adapters.keys import Role

CLIENTS = 8


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
    return ingest.per_core_note(got["cpu_s"], got["elapsed_s"], max(got["requests"], 1))


def reads(ctx: Context) -> dict[str, Any]:
    def measure() -> dict[str, Any]:
        m = pipeline_db(ctx)
        url, users = m["url"], m["users"]
        shop = ctx.create_key(Role.SHOP, "bench-shop", database_url=url)
        ops = ctx.create_key(Role.OPERATOR, "bench-ops", database_url=url)
        seconds = ctx.pick(quick=3.0, full=10.0)
        best: dict[str, dict[str, Any]] = {}
        with servers.serve(url, kind=ingest.SERVER, processes=2) as running:
            for i, phase in enumerate(("trivial", "member", "trivial", "member")):
                spec = _spec(
                    ctx,
                    url,
                    running,
                    key=ops if phase == "trivial" else shop,
                    kind="forget404" if phase == "trivial" else "member",
                    users=users,
                    time_limit=seconds,
                    warmup_s=1.0 if i < 2 else 0.3,
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
        "baseline_route": "GET /v1/forget-requests/{unknown id} (auth + 1 PK read, 404)",
        "requests": member["requests"],
        "errors": member["errors"],
        "p50_ms": member["p50_ms"],
        "p99_ms": member["p99_ms"],
        "baseline_p50_ms": trivial["p50_ms"],
        "baseline_p99_ms": trivial["p99_ms"],
        "members": pipeline_db(ctx)["users"],
        "server": f"{ingest.SERVER} x2",
        **_note(member),
        "pg_waits": member["pg_waits"],
        "first_error": member["first_error"],
        "target": "ratio >= 0.7 and p99_ms <= 10 and errors == 0",
    }


@benchmark("spend", order=50)
def spend(ctx: Context) -> Result:
    """POST /v1/members/{id}/spend across many funded members, vs member_read."""
    m = pipeline_db(ctx)
    url = m["url"]
    funded = min(m["users"], ctx.pick(quick=1_000, full=5_000))
    shop = ctx.create_key(Role.SHOP, "bench-spend", database_url=url)
    ops = ctx.create_key(Role.OPERATOR, "bench-fund", database_url=url)
    with servers.serve(url, kind=ingest.SERVER, processes=2) as running:
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
                time_limit=ctx.pick(quick=4.0, full=10.0),
                warmup_s=1.0,
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
        "server": f"{ingest.SERVER} x2",
        **_note(got),
        "pg_waits": got["pg_waits"],
        "first_error": got["first_error"],
        "target": "errors == 0",
    }
