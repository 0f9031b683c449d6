"""Every ``loyalty`` command through typer's CliRunner (the process-level commands
``serve`` and ``worker`` also run for real in test_live_server / test_metrics)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.bootstrap import build_pipeline, build_projection
from loyalty.cli import app
from loyalty.config import Settings
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.conftest import drain_with
from tests.e2e.live import free_port

Run = Callable[..., Any]


@pytest.fixture
def run(settings: Settings) -> Run:
    """run(*args, input=None) -> click Result, with the test database's settings."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        return runner.invoke(
            app,
            list(args),
            input=input,
            env={"LOYALTY_DATABASE_URL": settings.database_url, **(env or {})},
            catch_exceptions=False,
        )

    return invoke


def one_line_error(result: Any) -> str:
    # the line saying which database the command uses is not an error (#27)
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("database: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return str(lines[0])


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path under a (typer-vendored) click group."""
    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path
        if hasattr(command, "commands"):
            yield from _commands(command, path)


def test_help_everywhere() -> None:
    root = typer.main.get_command(app)
    paths = list(_commands(root))
    for expected in (
        ("serve",),
        ("worker",),
        ("migrate",),
        ("keys", "create"),
        ("rules", "show"),
        ("rules", "load"),
        ("projections", "rebuild"),
        ("simulate",),
        ("report",),
    ):
        assert expected in paths
    runner = CliRunner()
    for path in [(), *paths]:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


def test_migrate(run: Run) -> None:
    result = run("migrate")
    assert result.exit_code == 0 and result.stdout.startswith("schema at revision ")


def test_bad_setting_is_one_line_and_exit_2(run: Run) -> None:
    result = run("rules", "show", env={"LOYALTY_DATABASE_URL": "mysql://nope"})
    assert result.exit_code == 2
    assert "LOYALTY_DATABASE_URL" in one_line_error(result)


def test_keys_create_list_revoke(run: Run) -> None:
    created = run("keys", "create", "--role", "shop", "--name", "webshop")
    assert created.exit_code == 0
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("lk_")
    listed = run("keys", "list")
    assert listed.exit_code == 0 and "webshop" in listed.stdout and key not in listed.stdout
    key_id = key.split("_")[1]
    assert key_id in listed.stdout
    assert run("keys", "revoke", key_id).exit_code == 0
    again = run("keys", "revoke", key_id)
    assert again.exit_code == 1 and "no active key" in one_line_error(again)
    bad_role = run("keys", "create", "--role", "king", "--name", "x")
    assert bad_role.exit_code == 2


def test_rules_show_prints_the_current_rules(run: Run) -> None:
    result = run("rules", "show")
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["version"] == 1
    assert [r["event_type"] for r in shown["rules"]] == [
        r["event_type"] for r in DEFAULT_RULES_WIRE["rules"]
    ]


def test_rules_load_stores_a_new_version(run: Run, tmp_path: Path) -> None:
    wire = json.loads(run("rules", "show").stdout)
    wire["rules"][0]["currency"] = 3
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(wire))  # the shown shape (with "version") loads as is
    result = run("rules", "load", str(path))
    assert result.exit_code == 0 and result.stdout.strip() == "loaded rules version 2"
    assert json.loads(run("rules", "show").stdout)["rules"][0]["currency"] == 3
    from_stdin = run("rules", "load", "-", input=json.dumps(wire))
    assert from_stdin.stdout.strip() == "loaded rules version 3"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (
            '{"rules": [{"event_type": "x", "currency": -1, "rank_points": 1}], "ranks": []}',
            "rules[0].currency",
        ),  # fmt: skip
        ('{"rules": [], "ranks": [], "extra": 1}', "extra"),
        # as PUT /v1/rules: an object repeating a key is refused, not last-wins (#27)
        (
            '{"rules": [], "ranks": [{"name": "b", "min_rank_points": 0}], "rules": []}',
            "repeats a key",
        ),
    ],
)
def test_rules_load_refuses_bad_files_in_one_line(
    run: Run, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "rules.json"
    if content is not None:
        path.write_text(content)
    result = run("rules", "load", str(path))
    assert result.exit_code == 2
    assert message in one_line_error(result)
    assert json.loads(run("rules", "show").stdout)["version"] == 1  # nothing stored


@pytest.mark.slow  # in-process but long: left out of make test-fast
def test_report_prints_a_table_and_writes_a_png(
    run: Run,
    client: TestClient,
    make_key: Callable[..., dict[str, str]],
    db: Database,
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC).isoformat()
    events = [
        {"event_id": f"e{i}", "user_id": f"u{i % 3}", "type": t, "occurred_at": now}
        for i, t in enumerate(["logged_on", "played_game", "played_game", "made_purchase"])
    ]
    resp = client.post("/v1/ingress/batches", json={"events": events}, headers=make_key())
    assert resp.json()["accepted"] == 4
    container = client.app.state.container  # type: ignore[attr-defined]
    # until nothing is pending: a writing transaction elsewhere on the server (another
    # xdist worker) may hide new rows from one pass (tests/conftest.py drain_pipeline)
    drain_with(build_pipeline(db, container.accounts.app), db, record=False)
    build_projection(db, container.accounts.app).catch_up()
    shop = make_key("shop", "web")
    spent = client.post("/v1/members/u1/spend", json={"order_id": "o", "amount": 2}, headers=shop)
    assert spent.status_code == 200
    build_projection(db, container.accounts.app).catch_up()

    out = tmp_path / "charts" / "report.png"
    result = run("report", "--days", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    today = datetime.now(UTC).date().isoformat()
    row = next(line for line in result.stdout.splitlines() if line.lstrip("│ ").startswith(today))
    cells = [c.strip() for c in row.strip("│┃ ").split("│")]
    # day, played_game, logged_on, made_purchase, events, active, earning, awarded,
    # credited, spent, refunded, outstanding, holders
    assert cells[1:5] == ["2", "1", "1", "4"]
    assert cells[5:8] == ["3", "4", "21"]
    assert cells[8:13] == ["21", "2", "0", "19", "3"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"chart written to {out}" in result.stdout

    # --json is what GET /v1/reports/daily answers
    as_json = run("report", "--from", today, "--to", today, "--json")
    assert as_json.exit_code == 0, as_json.output
    api = client.get(
        "/v1/reports/daily", params={"from": today, "to": today}, headers=make_key("operator")
    )
    assert api.status_code == 200, api.text
    assert json.loads(as_json.stdout) == api.json()
    assert api.json()["days"][0]["outstanding_currency"] == 19

    empty = run("report", "--days", "1")
    assert empty.exit_code == 0
    assert run("report", "--days", "0").exit_code == 2
    assert run("report", "--from", today, "--to", "2000-01-01").exit_code == 2
    assert run("report", "--from", "yesterday").exit_code == 2


def test_report_on_an_empty_database(run: Run) -> None:
    result = run("report")
    assert result.exit_code == 0 and "total" in result.stdout


def test_projections_rebuild(run: Run, db: Database) -> None:
    result = run("projections", "rebuild")
    assert result.exit_code == 0, result.output
    assert "rebuilt read models from 0 events" in result.stdout


def test_simulate_refuses_bad_options_and_unreachable_services(run: Run) -> None:
    bad_url = run("simulate", "--key", "k", "--url", "ftp://example")
    assert bad_url.exit_code == 2 and "--url" in one_line_error(bad_url)
    assert run("simulate", "--key", "k", "--events", "0").exit_code == 2
    assert run("simulate").exit_code == 2  # --key is required
    down = run("simulate", "--key", "k", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.exit_code == 1 and "cannot reach" in one_line_error(down)


def test_serve_and_worker_refuse_bad_shards(run: Run) -> None:
    for command in ("serve", "worker"):
        result = run(command, "--shards", "3-99")
        assert result.exit_code == 2 and "shards" in one_line_error(result)


def test_keys_created_by_the_cli_work(run: Run, db: Database) -> None:
    key = run("keys", "create", "--role", "ingest", "--name", "g").stdout.strip().splitlines()[-1]
    principal = KeyStore(db).verify(key)
    assert principal is not None and principal.name == "g"


def test_a_one_shot_command_elsewhere_refuses_to_make_a_new_database(tmp_path: Path) -> None:
    """#27: the default URL (sqlite:///./var/loyalty.db) is relative; run from another
    directory, `keys list` / `keys create` used to create and use a new, empty database
    there (a key made so got 401 from the server). Now they refuse, naming the file, and
    every command says which database it uses (on stderr: stdout stays the output)."""
    import os
    import subprocess

    from tests.e2e.live import LOYALTY

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    server_dir, elsewhere = tmp_path / "server", tmp_path / "elsewhere"
    server_dir.mkdir()
    elsewhere.mkdir()

    def loyalty(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LOYALTY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )

    made = loyalty(server_dir, "migrate")
    assert made.returncode == 0, made.stderr
    database = (server_dir / "var" / "loyalty.db").resolve()
    assert f"database: sqlite {database}" in made.stderr
    created = loyalty(server_dir, "keys", "create", "--role", "shop", "--name", "web")
    assert created.returncode == 0 and created.stdout.splitlines()[-1].startswith("lk_")
    assert f"database: sqlite {database}" in created.stderr
    assert "database:" not in created.stdout  # `| tail -1` still gives the key
    for args in (("keys", "list"), ("keys", "create", "--role", "shop", "--name", "x")):
        refused = loyalty(elsewhere, *args)
        assert refused.returncode == 2, refused
        assert f"no database at {(elsewhere / 'var' / 'loyalty.db').resolve()}" in " ".join(
            refused.stderr.split()
        )
    assert not (elsewhere / "var" / "loyalty.db").exists()
    listed = loyalty(server_dir, "keys", "list")
    assert listed.returncode == 0 and "web" in listed.stdout
    forced = loyalty(elsewhere, "--create", "keys", "list")
    assert forced.returncode == 0 and (elsewhere / "var" / "loyalty.db").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--from", "9999-12-31", "--to", "9999-12-31"), "--to"),
        (("--from", "9999-12-31"), "--from"),
        (("--to", "0001-01-05"), "--to"),
        (("--from", "2026-02-30"), "--from"),
    ],
)
def test_report_days_out_of_range_are_one_line_errors(
    run: Run, args: tuple[str, ...], option: str
) -> None:
    """#27: the CLI's report takes the API's bounded day (a traceback before)."""
    result = run("report", *args)
    assert result.exit_code == 2
    assert one_line_error(result).startswith(f"error: {option} ")


def test_forget_takes_the_apis_user_id_rule(run: Run) -> None:
    """#27: `loyalty forget` builds the API's ForgetRequestBody (it took any text)."""
    for bad in ("a\x00b", "a/b", "..", "x" * 129):
        result = run("forget", bad, "--wait", "1")
        assert result.exit_code == 2, bad
        assert one_line_error(result).startswith("error: user id: ")


def test_keys_list_fits_80_columns_with_whole_utc_times_and_warns_on_a_second_name(
    run: Run,
) -> None:
    """#33 items 6 and 7: created_at is never cut at 80 columns and is written as the API
    writes times (Z); a second active key of a name is made, with a warning."""
    first = run("keys", "create", "--role", "ingest", "--name", "gamesite-eu-west")
    assert first.exit_code == 0 and "warning" not in first.stderr
    again = run("keys", "create", "--role", "ingest", "--name", "gamesite-eu-west")
    assert again.exit_code == 0
    first_id = first.stdout.strip().splitlines()[-1].split("_")[1]
    assert "warning: another active key is named gamesite-eu-west" in again.stderr
    assert first_id in again.stderr
    listed = run("keys", "list", env={"COLUMNS": "80"})
    assert listed.exit_code == 0
    rows = [line for line in listed.stdout.splitlines() if first_id in line]
    assert len(rows) == 1 and max(len(line) for line in listed.stdout.splitlines()) <= 80
    assert re.search(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b", rows[0]), rows[0]
