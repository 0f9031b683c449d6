"""The console's forms and query strings, property-based (#27): whatever an operator (or
a hostile page) sends to a console page, the answer is never a 500, and what the console
stores stays within ``loyalty.domain.limits`` (the read models keep projecting).

Values: huge and signed integers as text (``9223372036854775808``, ``10**30``), days at
the edges of the calendar, control characters and NUL, lone surrogates, empty and
over-long text. One migrated SQLite file for the module (copied from the session
template), one signed-in console session, driven through ``create_app``."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.read_models import ReadModels
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.bootstrap import build_projection
from loyalty.config import Settings
from loyalty.domain.limits import MAX_AMOUNT

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

EDGE_NUMBERS = ["0", "-1", "1", str(MAX_AMOUNT), str(MAX_AMOUNT + 1), str(-MAX_AMOUNT - 1)]
EDGE_NUMBERS += [str(2**63 - 1), str(2**63), str(-(2**63) - 1), str(10**30), "10**30", "1e3"]
EDGE_NUMBERS += ["99999999999999999999", " 5", "5 ", "+5", "0x10", "1_000", "٣", ""]
EDGE_DAYS = ["9999-12-31", "0001-01-01", "0001-01-05", "1969-12-31", "9000-12-31"]
EDGE_DAYS += ["9001-01-01", "2026-02-30", "2026-11-01", "20261101", "", "-2026-01-01"]
# a browser cannot send a lone surrogate in a form (it sends U+FFFD): none here
NASTY = ["\x00", "\x1b", "\x7f", "\n", "\u202e", "\ufeff", "\U0001f600", "/"]

text = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(NASTY)), max_size=300)
number = st.one_of(st.sampled_from(EDGE_NUMBERS), st.integers().map(str), text)
day = st.one_of(st.sampled_from(EDGE_DAYS), st.dates().map(str), text)
user_id = st.one_of(st.sampled_from(["alice", "bob"]), text)


class Console:
    def __init__(self, client: TestClient, db: Database, csrf: str) -> None:
        self.client = client
        self.db = db
        self.csrf = csrf

    def post(self, path: str, form: dict[str, str]) -> Any:
        return self.client.post(
            path, data={"csrf": self.csrf, **form}, headers={"HX-Request": "true"}
        )


@pytest.fixture(scope="module")
def console(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    path = tmp_path_factory.mktemp("console-forms") / "loyalty.db"
    shutil.copy(sqlite_template, path)
    db = Database(Settings(database_url=f"sqlite:///{path}"))
    key = KeyStore(db).create(Role.OPERATOR, "forms")
    app = create_app(db.settings, db=db)
    with TestClient(app, raise_server_exceptions=False) as client:
        form = client.get("/console/sign-in").text
        pre = re.search(r'name="csrf" value="([^"]+)"', form)
        assert pre
        signed = client.post(
            "/console/sign-in", data={"csrf": pre.group(1), "key": key}, follow_redirects=False
        )
        assert signed.status_code == 303
        found = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/").text)
        assert found
        yield Console(client, db, found.group(1))
    db.dispose()


def assert_handled(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:400])


@SETTINGS
@given(
    action=st.sampled_from(["spend", "refund", "adjust"]),
    who=user_id,
    ident=st.one_of(st.sampled_from(["o1", "a1"]), text),
    amount=number,
    currency=number,
    rank_points=number,
    reason=st.one_of(st.just("goodwill"), text),
)
def test_member_forms_never_fail_and_store_only_what_the_read_models_hold(
    console: Console,
    action: str,
    who: str,
    ident: str,
    amount: str,
    currency: str,
    rank_points: str,
    reason: str,
) -> None:
    form = {"user_id": who, "order_id": ident, "adjustment_id": ident, "amount": amount}
    form.update(currency=currency, rank_points=rank_points, reason=reason)
    assert_handled(console.post(f"/console/members/{action}", form))
    # everything stored can be projected, and nothing had to be quarantined
    container = console.client.app.state.container  # type: ignore[attr-defined]
    build_projection(console.db, container.accounts.app).catch_up()
    assert ReadModels(console.db).quarantined_count() == 0


@SETTINGS
@given(first=day, last=day, export=st.booleans())
def test_report_ranges_never_fail(console: Console, first: str, last: str, export: bool) -> None:
    path = "/console/reports/export.csv" if export else "/console/reports"
    assert_handled(console.client.get(path, params={"from": first, "to": last}))


@SETTINGS
@given(first=day, through=day, rules=st.one_of(st.just("{}"), text))
def test_dry_run_periods_never_fail(console: Console, first: str, through: str, rules: str) -> None:
    current = '{"rules": [], "ranks": [{"name": "bronze", "min_rank_points": 0}]}'
    for document in (current, rules):
        form = {"rules": document, "from": first, "through": through}
        assert_handled(console.post("/console/rules/dry-run", form))


@SETTINGS
@given(
    version=number,
    who=user_id,
    award=st.one_of(st.just("pending"), text),
    request_id=text,
)
def test_pages_with_ids_in_the_address_never_fail(
    console: Console, version: str, who: str, award: str, request_id: str
) -> None:
    client = console.client
    address = quote(version, safe="", errors="surrogatepass")
    assert_handled(client.get(f"/console/rules/versions/{address}"))
    assert_handled(client.get("/console/members", params={"user_id": who}))
    assert_handled(
        client.get("/console/members/explain", params={"user_id": who, "award_id": award})
    )
    assert_handled(client.get("/console/forget/lookup", params={"request_id": request_id}))


@SETTINGS
@given(who=user_id, name=text, role=st.one_of(st.sampled_from(["shop", "ingest"]), text))
def test_forget_and_key_forms_never_fail(console: Console, who: str, name: str, role: str) -> None:
    assert_handled(console.post("/console/forget", {"user_id": who}))
    assert_handled(console.post("/console/keys", {"name": name, "role": role}))
