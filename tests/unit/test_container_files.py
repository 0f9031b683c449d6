"""The Dockerfile and docs/compose.yaml cannot run here: check them on paper."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from loyalty.bootstrap import parse_shards
from loyalty.cli import app
from loyalty.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "compose.yaml").read_text())
    return loaded


def parse_cli(args: list[str]) -> dict[str, Any]:
    """Parse ``loyalty ARGS`` like the real command would (without running it); returns
    the subcommand's parameters."""
    group: Any = typer.main.get_command(app)
    ctx = group.make_context("loyalty", list(args), resilient_parsing=False)
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    while hasattr(group, "commands"):
        name, command, rest = group.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        group, rest = command, [*getattr(ctx, "_protected_args", []), *ctx.args]
    params: dict[str, Any] = ctx.params
    return params


def loyalty_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if s.get("image") == "loyalty:latest"}


def test_every_compose_command_is_a_valid_cli_call() -> None:
    services = loyalty_services()
    assert {"migrate", "api", "worker-a", "worker-b"} <= services.keys()
    for name, service in services.items():
        parse_cli(service["command"])  # raises on an unknown command or option
        env = service["environment"]
        Settings(**{k.removeprefix("LOYALTY_").lower(): v for k, v in env.items()})
        assert env["LOYALTY_DATABASE_URL"].startswith("postgresql://"), name


def test_api_processes_run_no_worker_and_bind_all_interfaces() -> None:
    api = parse_cli(loyalty_services()["api"]["command"])
    assert api["worker"] is False and api["host"] == "0.0.0.0"
    assert loyalty_services()["api"]["deploy"]["replicas"] >= 2


def test_workers_have_disjoint_shards_covering_all() -> None:
    services = loyalty_services()
    count = int(services["api"]["environment"]["LOYALTY_SHARD_COUNT"])
    owned: list[int] = []
    for service in services.values():
        if service["command"][0] == "worker":
            owned += parse_shards(parse_cli(service["command"])["shards"], count)
    assert sorted(owned) == list(range(count)), "each shard in exactly one worker"


def dockerfile() -> list[str]:
    """Instructions of the final stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    return lines[last_from:]


def test_dockerfile_is_slim_non_root_with_a_healthcheck() -> None:
    final = dockerfile()
    assert final[0] == "FROM python:3.11-slim"
    user = [ln for ln in final if ln.startswith("USER ")][-1].split()[1]
    assert user.split(":")[0] not in ("root", "0")
    health = next(ln for ln in final if ln.startswith("HEALTHCHECK "))
    assert "/healthz" in health
    entry = next(ln for ln in final if ln.startswith("ENTRYPOINT "))
    cmd = next(ln for ln in final if ln.startswith("CMD "))
    assert yaml.safe_load(entry.split(" ", 1)[1]) == ["loyalty"]
    serve = yaml.safe_load(cmd.split(" ", 1)[1])
    assert serve[:3] == ["serve", "--host", "0.0.0.0"]
    parse_cli(serve)


@pytest.mark.parametrize("line", ["loyalty worker --shards 0-7 --metrics-port 9100"])
def test_documented_worker_command_parses(line: str) -> None:
    params = parse_cli(shlex.split(line)[1:])
    assert params["metrics_port"] == 9100


def test_the_compose_deployment_fits_a_default_postgresql() -> None:
    """N APIs + K workers + the relay, each at its LOYALTY_DB_POOL_SIZE, stay within about
    2/3 of PostgreSQL's default max_connections (100), as docs/deployment.md asks."""
    total = 0
    for name, service in loyalty_services().items():
        if service.get("restart") == "no":  # the one-shot migrate
            continue
        replicas = int(service.get("deploy", {}).get("replicas", 1))
        budget = int(service["environment"]["LOYALTY_DB_POOL_SIZE"])
        assert budget >= 4, name  # a worker needs its lease session and three more
        total += replicas * budget
    assert total <= 100 * 2 // 3, total


def test_the_proxy_balances_the_api_replicas_with_the_shipped_config() -> None:
    """The proxy mounts docs/nginx.conf, whose upstream is the ``api`` service at the port
    its replicas listen on (Docker's DNS gives nginx one address per replica; the live
    balancing is tests/e2e/test_nginx_config.py)."""
    services = compose()["services"]
    proxy = services["proxy"]
    mounts = [v.split(":") for v in proxy["volumes"]]
    assert [m[1] for m in mounts] == ["/etc/nginx/nginx.conf"]
    conf = (ROOT / "docs" / mounts[0][0]).resolve()
    assert conf == ROOT / "docs" / "nginx.conf" and conf.is_file()
    api = loyalty_services()["api"]
    port = parse_cli(api["command"])["port"]
    assert f"server api:{port};" in conf.read_text()
    assert "api" in proxy["depends_on"] and api["deploy"]["replicas"] >= 2
    assert "ports" not in api  # reached only through the proxy
