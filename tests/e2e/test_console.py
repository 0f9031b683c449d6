"""The operator console over HTTP (``create_app`` on both backends): sessions, CSRF,
cookie flags, operator-only sign-in, strict CSP and vendored assets, and what each page
does. The browser itself drives it in ``test_console_browser.py``."""

from __future__ import annotations

import hashlib
import html as html_module
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.delivery_store import SqlDeliveryStore
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.tables import console_sessions
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.application.delivery import FeedEvent
from loyalty.config import Settings
from loyalty.console.rendering import CSP, STATIC
from tests.conftest import Clock

HTMX = STATIC / "htmx"
PAGES = ["/console/", "/console/members", "/console/rules", "/console/forget"]
PAGES += ["/console/keys", "/console/webhooks", "/console/dashboard/live"]


def key_of(store: KeyStore, role: Role, name: str) -> str:
    return store.create(role, name)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def sign_in(client: TestClient, key: str) -> str:
    """Sign ``client`` in with ``key``; the session's CSRF token."""
    form = client.get("/console/sign-in")
    answer = client.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "key": key},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return csrf_of(client.get("/console/").text)


@pytest.fixture
def operator(db: Database) -> str:
    return key_of(KeyStore(db), Role.OPERATOR, "ops-alice")


@pytest.fixture
def console(client: TestClient, operator: str) -> tuple[TestClient, str]:
    return client, sign_in(client, operator)


def session_rows(db: Database) -> list[tuple[str, ...]]:
    with db.read() as conn:
        return [tuple(str(v) for v in r) for r in conn.execute(sa.select(console_sessions)).all()]


# ----------------------------------------------------------------- assets and CSP


def test_vendored_htmx_is_the_pinned_release_with_its_licence() -> None:
    listed = dict(
        reversed(line.split()) for line in (HTMX / "SHA256SUMS").read_text().splitlines() if line
    )
    assert set(listed) == {"htmx.min.js", "LICENSE"}
    for name, digest in listed.items():
        assert hashlib.sha256((HTMX / name).read_bytes()).hexdigest() == digest, name
    source = (HTMX / "SOURCE.md").read_text()
    pinned = re.search(r"htmx\.org` version \*\*([0-9.]+)\*\*", source)
    assert pinned and pinned.group(1) == "2.0.11"
    assert f'version:"{pinned.group(1)}"' in (HTMX / "htmx.min.js").read_text()
    assert "sha512-" in source  # the registry's integrity, recorded
    assert "Zero-Clause BSD" in (HTMX / "LICENSE").read_text()


def test_every_page_loads_only_its_own_assets_under_a_strict_csp(
    console: tuple[TestClient, str],
) -> None:
    client, _csrf = console
    for path in [*PAGES, "/console/sign-in"]:
        page = client.get(path)
        assert page.status_code == 200, path
        csp = page.headers["content-security-policy"]
        assert csp == CSP
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
        directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert directives["default-src"] == "'none'"
        html = page.text
        assert not re.search(r"(https?:)?//[a-z0-9]", html, flags=re.I), path  # no external URL
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path  # no inline script
        assert "<style" not in html and " style=" not in html, path  # no inline style
        assert not re.search(r"\son[a-z]+=", html), path  # no inline event handlers
        assert not re.search(r"hx-on|javascript:", html), path
    page = client.get("/console/").text
    for asset in re.findall(r'(?:src|href)="(/console/static/[^"]+)"', page):
        served = client.get(asset)
        assert served.status_code == 200
        assert served.content == (STATIC / asset.removeprefix("/console/static/")).read_bytes()
    config = html_module.unescape(page)
    assert '"includeIndicatorStyles": false' in config and '"allowEval": false' in config


def test_the_console_is_not_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/console")]
    bare = client.get("/console", follow_redirects=False)  # the address one types
    assert bare.status_code == 308 and bare.headers["location"] == "/console/"


# ------------------------------------------------------------------------- sign-in


def test_only_operator_keys_sign_in(client: TestClient, db: Database) -> None:
    store = KeyStore(db)
    revoked = key_of(store, Role.OPERATOR, "gone")
    store.revoke(revoked)
    for key in (
        key_of(store, Role.SHOP, "shop"),
        key_of(store, Role.INGEST, "gamesite"),
        key_of(store, Role.FEED, "crm"),
        revoked,
        "lk_0000000000000000_" + "A" * 43,
    ):
        form = client.get("/console/sign-in")
        answer = client.post(
            "/console/sign-in",
            data={"csrf": csrf_of(form.text), "key": key},
            follow_redirects=False,
        )
        assert answer.status_code == 403
        assert "only operator keys" in answer.text or "unknown or revoked" in answer.text
        assert "loyalty_console=" not in answer.headers.get("set-cookie", "")
        assert key not in answer.text  # the key is not echoed back
    assert session_rows(db) == []
    assert client.get("/console/", follow_redirects=False).headers["location"] == "/console/sign-in"


def test_sign_in_needs_the_forms_token(client: TestClient, operator: str, db: Database) -> None:
    client.get("/console/sign-in")
    answer = client.post("/console/sign-in", data={"key": operator}, follow_redirects=False)
    assert answer.status_code == 403 and "csrf_failed" in answer.text
    assert session_rows(db) == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_session_cookie_is_httponly_strict_and_secure_over_https(
    settings: Settings, db: Database, operator: str, scheme: str
) -> None:
    with TestClient(create_app(settings, db=db), base_url=f"{scheme}://testserver") as client:
        form = client.get("/console/sign-in")
        answer = client.post(
            "/console/sign-in",
            data={"csrf": csrf_of(form.text), "key": operator},
            follow_redirects=False,
        )
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("loyalty_console=")
    )
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags
    assert ("secure" in flags) is (scheme == "https")
    session_id = cookie.split(";")[0].split("=", 1)[1]
    rows = session_rows(db)
    assert len(rows) == 1
    stored = " ".join(rows[0])
    # the table holds the id's hash and the key's id, never the id or the key
    assert session_id not in stored and hashlib.sha256(session_id.encode()).hexdigest() in stored
    assert operator not in stored and operator.split("_", 2)[2] not in stored
    assert operator.split("_")[1] in stored  # the key id


# ------------------------------------------------------------------------------ CSRF


def test_every_form_is_refused_without_the_sessions_csrf_token(
    console: tuple[TestClient, str], db: Database
) -> None:
    client, csrf = console
    posts = {
        "/console/members/adjust": {
            "user_id": "alice",
            "adjustment_id": "a1",
            "currency": "100",
            "rank_points": "0",
            "reason": "goodwill",
        },
        "/console/members/spend": {"user_id": "alice", "order_id": "o1", "amount": "1"},
        "/console/rules": {"rules": '{"rules": [], "ranks": []}'},
        "/console/forget": {"user_id": "alice"},
        "/console/keys": {"role": "operator", "name": "intruder"},
        "/console/webhooks": {"url": "https://example.com/x"},
        "/console/webhooks/replay": {},
        "/console/sign-out": {},
    }
    keys_before = len(KeyStore(db).list())
    for path, form in posts.items():
        for token in (None, "wrong-" + csrf, csrf[:-1]):
            data = form if token is None else {**form, "csrf": token}
            answer = client.post(path, data=data, follow_redirects=False)
            assert answer.status_code == 403, (path, token)
            assert "csrf_failed" in answer.text
        # a token from the header is checked the same way
        answer = client.post(path, data=form, headers={"X-CSRF-Token": "x"}, follow_redirects=False)
        assert answer.status_code == 403
    assert len(KeyStore(db).list()) == keys_before
    assert "no account" in client.get("/console/members", params={"user_id": "alice"}).text
    assert len(session_rows(db)) == 1  # not signed out
    # with the token (here in htmx's header), the same form works
    adjust = posts["/console/members/adjust"]
    answer = client.post(
        "/console/members/adjust",
        data=adjust,
        headers={"X-CSRF-Token": csrf, "HX-Request": "true"},
    )
    assert answer.status_code == 200 and 'id="balance">100<' in answer.text


def test_revoking_the_key_signs_the_console_out(
    console: tuple[TestClient, str], operator: str
) -> None:
    client, csrf = console
    key_id = operator.split("_")[1]
    answer = client.post(f"/console/keys/{key_id}/revoke", data={"csrf": csrf, "confirm": "yes"})
    assert answer.url.path == "/console/sign-in"  # redirected to the keys page, then out
    again = client.get("/console/keys", follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/console/sign-in"
    htmx = client.get("/console/dashboard/live", headers={"HX-Request": "true"})
    assert htmx.status_code == 401 and htmx.headers["hx-redirect"] == "/console/sign-in"


def test_sessions_expire_and_sign_out_ends_them(
    console: tuple[TestClient, str], clock: Clock, db: Database, settings: Settings
) -> None:
    client, csrf = console
    assert client.get("/console/", follow_redirects=False).status_code == 200
    clock.now += timedelta(minutes=settings.console_session_minutes, seconds=1)
    assert client.get("/console/", follow_redirects=False).status_code == 303
    clock.now = datetime.now(UTC)
    assert client.get("/console/", follow_redirects=False).status_code == 200
    cookie = client.cookies.get("loyalty_console")
    client.post("/console/sign-out", data={"csrf": csrf})
    assert session_rows(db) == []
    client.cookies.set("loyalty_console", cookie or "", path="/console")
    assert client.get("/console/", follow_redirects=False).status_code == 303


# ----------------------------------------------------------------------------- pages


def act(client: TestClient, csrf: str, action: str, **form: str) -> tuple[int, str]:
    answer = client.post(
        f"/console/members/{action}",
        data={"csrf": csrf, **form},
        headers={"HX-Request": "true"},
    )
    return answer.status_code, answer.text


def balance(html: str) -> int:
    found = re.search(r'id="balance">(-?[0-9]+)<', html)
    assert found, html
    return int(found.group(1))


def message(html: str) -> str:
    found = re.search(r'id="result-message">([^<]*)<', html)
    assert found, html
    return found.group(1)


def test_member_actions_answer_in_place_with_their_result_or_error(
    console: tuple[TestClient, str],
) -> None:
    client, csrf = console
    adjust = {"user_id": "alice", "adjustment_id": "a1", "currency": "100", "rank_points": "20"}
    status, html = act(client, csrf, "adjust", **adjust, reason="")
    assert status == 422 and message(html).startswith("reason: ")
    status, html = act(client, csrf, "adjust", **adjust, reason="welcome")
    assert status == 200 and balance(html) == 100
    status, html = act(client, csrf, "spend", user_id="alice", order_id="o1", amount="500")
    assert status == 409 and "insufficient funds" in message(html) and balance(html) == 100
    status, html = act(client, csrf, "spend", user_id="alice", order_id="o1", amount="30")
    assert status == 200 and message(html) == "spent 30 on order o1" and balance(html) == 70
    status, html = act(client, csrf, "spend", user_id="alice", order_id="o2", amount="zero")
    assert status == 422 and "amount: Input should be a valid integer" in message(html)
    status, html = act(client, csrf, "refund", user_id="alice", order_id="nope")
    assert status == 404 and "order not found" in message(html)
    status, html = act(client, csrf, "refund", user_id="alice", order_id="o1")
    assert status == 200 and balance(html) == 100
    page = client.get("/console/members", params={"user_id": "alice"}).text
    assert balance(page) == 100 and 'id="rank-points">20<' in page
    # without htmx (no JavaScript) the whole page comes back with the result
    answer = client.post(
        "/console/members/spend",
        data={"csrf": csrf, "user_id": "alice", "order_id": "o3", "amount": "1"},
    )
    assert answer.status_code == 200 and "<h1>Members</h1>" in answer.text
    assert balance(answer.text) == 99 and message(answer.text) == "spent 1 on order o3"


def test_rules_editor_shows_errors_at_the_field_then_saves_a_version(
    console: tuple[TestClient, str],
) -> None:
    client, csrf = console
    page = client.get("/console/rules").text
    text = re.search(r'<textarea id="rules-text"[^>]*>([^<]*)</textarea>', page, re.S)
    assert text and 'id="rules-version">1<' in page
    current = text.group(1).replace("&#34;", '"').replace("&quot;", '"')
    broken = client.post("/console/rules", data={"csrf": csrf, "rules": current[:-3]})
    assert broken.status_code == 422 and "line " in broken.text
    assert 'aria-invalid="true" aria-describedby="rules-errors"' in broken.text
    invalid = current.replace('"ranks": [', '"ranks": [{"name": "", "min_rank_points": -1}, ', 1)
    answer = client.post("/console/rules", data={"csrf": csrf, "rules": invalid})
    assert answer.status_code == 422
    assert "<code>ranks[0].name</code>: must be a non-empty string" in answer.text
    assert "<code>ranks[0].min_rank_points</code>: must be &gt;= 0" in answer.text
    line = invalid.splitlines().index(next(x for x in invalid.splitlines() if '"ranks": [' in x))
    assert f'data-line="{line + 1}" aria-controls="rules-text">line {line + 1}<' in answer.text
    saved = client.post("/console/rules", data={"csrf": csrf, "rules": current, "confirm": "yes"})
    assert saved.status_code == 200 and "Saved as version 2." in saved.text
    assert 'id="rules-version">2<' in saved.text and "version 1</a>" in saved.text
    assert client.get("/console/rules/versions/1").status_code == 200
    assert client.get("/console/rules/versions/99").status_code == 404


def test_forget_me_request_progress_and_receipt_without_the_user_id(
    console: tuple[TestClient, str],
) -> None:
    client, csrf = console
    user = "forget-me-marker-7f3a"
    act(
        client,
        csrf,
        "adjust",
        user_id=user,
        adjustment_id="a",
        currency="5",
        rank_points="0",
        reason="x",
    )
    answer = client.post(
        "/console/forget",
        data={"csrf": csrf, "user_id": user, "confirm": "yes"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    receipt_path = answer.headers["location"]
    pending = client.get(receipt_path)
    assert "every 1s" in pending.text and user not in pending.text
    container = client.app.state.container  # type: ignore[attr-defined]
    container.forget.run_pending()
    done = client.get(receipt_path, headers={"HX-Request": "true"})
    assert 'id="forget-status">completed<' in done.text and "every 1s" not in done.text
    assert user not in done.text and 'id="erased"' in done.text
    listed = client.get("/console/forget").text
    assert receipt_path in listed and user not in listed  # in the receipts, without the id
    looked_up = client.get("/console/forget/lookup", params={"request_id": receipt_path[-32:]})
    assert looked_up.url.path == receipt_path
    bad = client.post("/console/forget", data={"csrf": csrf, "user_id": "a/b"})
    assert bad.status_code == 422 and 'id="forget-error"' in bad.text


def test_keys_secret_shown_once_and_revoked_from_the_list(
    console: tuple[TestClient, str], db: Database
) -> None:
    client, csrf = console
    created = client.post("/console/keys", data={"csrf": csrf, "role": "shop", "name": "till-1"})
    key = re.search(r'id="new-key" readonly value="(lk_[^"]+)"', created.text)
    assert key and KeyStore(db).verify(key.group(1)) is not None
    listing = client.get("/console/keys").text
    assert key.group(1) not in listing and key.group(1).split("_", 2)[2] not in listing
    key_id = key.group(1).split("_")[1]
    client.post(f"/console/keys/{key_id}/revoke", data={"csrf": csrf, "confirm": "yes"})
    assert KeyStore(db).verify(key.group(1)) is None
    refused = client.post("/console/keys", data={"csrf": csrf, "role": "root", "name": "x"})
    assert refused.status_code == 422


def test_webhooks_subscribe_secret_once_dead_letters_and_replay(
    settings: Settings, db: Database, operator: str, clock: Clock
) -> None:
    open_settings = settings.model_copy(update={"webhook_allow_private_urls": True})
    with TestClient(create_app(open_settings, clock=clock)) as client:
        csrf = sign_in(client, operator)
        created = client.post(
            "/console/webhooks",
            data={"csrf": csrf, "url": "http://127.0.0.1:9/hook", "event_type": "member.spent"},
        )
        assert created.status_code == 201
        secret = re.search(r'id="new-secret" readonly value="(whsec_[^"]+)"', created.text)
        assert secret and secret.group(1) not in client.get("/console/webhooks").text
        subscription = client.app.state.container.webhooks.subscriptions()[0]  # type: ignore[attr-defined]
        assert subscription.event_types == ("member.spent",)
        event = FeedEvent("ev1", 1, "member.spent", "bob", clock(), {"amount": 1})
        SqlDeliveryStore(db).add_dead_letter(subscription.subscription_id, event, 3, "timeout")
        page = client.get("/console/webhooks").text
        assert "<code>ev1</code>" in page
        assert "1 webhook dead letters" in client.get("/console/dashboard/live").text
        replayed = client.post("/console/webhooks/replay", data={"csrf": csrf})
        # nothing listens on port 9: still failing, still listed
        assert 'id="replayed">Replayed: 0 delivered, 1 still failing.' in replayed.text
        refused = client.post("/console/webhooks", data={"csrf": csrf, "url": "ftp://x"})
        assert refused.status_code == 422 and 'id="webhook-error"' in refused.text


def test_dashboard_shows_todays_totals_outstanding_currency_and_lag_alerts(
    settings: Settings,
    db: Database,
    operator: str,
    clock: Clock,
    make_key: Callable[..., dict[str, str]],
) -> None:
    from loyalty.bootstrap import build_projection

    alerting = settings.model_copy(
        update={"console_alert_lag_seconds": 0.0, "console_figures_seconds": 0.0}
    )
    with TestClient(create_app(alerting, db=db, clock=clock)) as client:
        csrf = sign_in(client, operator)
        act(
            client,
            csrf,
            "adjust",
            user_id="a",
            adjustment_id="1",
            currency="50",
            rank_points="0",
            reason="r",
        )
        act(client, csrf, "spend", user_id="a", order_id="o", amount="20")
        container = client.app.state.container  # type: ignore[attr-defined]
        build_projection(db, container.accounts.app).catch_up()
        ingest = make_key("ingest", "gamesite")
        event = {"event_id": "e1", "user_id": "b", "type": "logged_on"}
        event["occurred_at"] = (clock() - timedelta(minutes=5)).isoformat()
        assert (
            client.post("/v1/ingress/batches", json={"events": [event]}, headers=ingest).status_code
            == 202
        )
        clock.now += timedelta(seconds=30)
        live = client.get("/console/dashboard/live").text
        assert 'id="today-currency_spent" data-field="currency_spent">20<' in live
        assert re.search(r'id="today-outstanding_currency" data-field="[a-z_]+">30 ', live)
        assert 'id="pipeline-pending">1<' in live
        assert "pipeline lag" in live and 'class="alert"' in live
        assert "ingress_events" in live or "stored_events" in live  # storage by location
        assert "Ingress events are kept 7 days" in live


def test_member_page_handles_unknown_and_invalid_user_ids(console: tuple[TestClient, str]) -> None:
    client, _csrf = console
    unknown = client.get("/console/members", params={"user_id": "nobody"})
    assert unknown.status_code == 200 and 'id="member-missing"' in unknown.text
    invalid = client.get("/console/members", params={"user_id": "a/b"})
    assert 'role="alert">user id:' in invalid.text


def test_reports_chart_the_rollups_for_a_date_range_and_export_it(
    console: tuple[TestClient, str],
    db: Database,
    clock: Clock,
    make_key: Callable[..., dict[str, str]],
) -> None:
    from loyalty.bootstrap import build_projection
    from tests.conftest import drain_pipeline

    client, csrf = console
    now = clock()
    events = [
        {"event_id": f"e{i}", "user_id": f"u{i % 3}", "type": "logged_on"}
        | {"occurred_at": (now - timedelta(days=i % 2)).isoformat()}
        for i in range(7)
    ]
    ingest = make_key("ingest", "gamesite")
    answer = client.post("/v1/ingress/batches", json={"events": events}, headers=ingest)
    assert answer.status_code == 202 and answer.json()["accepted"] == 7
    act(
        client,
        csrf,
        "adjust",
        user_id="u0",
        adjustment_id="r",
        currency="40",
        rank_points="0",
        reason="goodwill",
    )
    act(client, csrf, "spend", user_id="u0", order_id="o", amount="15")
    container = client.app.state.container  # type: ignore[attr-defined]
    drain_pipeline(db, container.accounts.app)
    build_projection(db, container.accounts.app).catch_up()
    today, yesterday = now.date(), now.date() - timedelta(days=1)
    first = today - timedelta(days=6)
    page = client.get(
        "/console/reports", params={"from": first.isoformat(), "to": today.isoformat()}
    )
    assert page.status_code == 200
    # the charts start on the first day with data (yesterday), the days before it named
    # as "no data" rather than drawn as zeros; each chart has dates and values as text
    note = re.search(r'<p class="notice" role="status" id="no-data">([^<]*)</p>', page.text)
    assert note and note.group(1) == (
        f"No data from {first} to {yesterday - timedelta(days=1)}: the charts start at {yesterday}."
    )

    def chart(field: str) -> list[str]:
        found = re.search(
            rf'<figure class="chart" data-field="{field}".*?</figure>', page.text, re.S
        )
        assert found, field
        assert "<style" not in found.group(0) and " style=" not in found.group(0)
        return [
            html_module.unescape(t)
            for t in re.findall(r"<text[^>]*>([^<]*)</text>", found.group(0))
        ]

    dates = [yesterday.strftime("%b %d"), today.strftime("%b %d")]
    events_text = chart("events")
    assert all(d in events_text for d in dates), events_text
    assert (first.strftime("%b %d")) not in events_text  # no false zeros before the data
    assert {"3", "4", "events", f"UTC day, {yesterday} to {today}"} <= set(events_text)
    spent_text = chart("currency_spent")
    assert "15" in spent_text and "currency" in spent_text and dates[1] in spent_text
    table_days = re.findall(r"<tr><td><time>([0-9-]+)</time>", page.text)
    assert table_days == [str(yesterday), str(today)]
    # the export link gives the same range as CSV
    link = re.search(r'href="(/console/reports/export\.csv\?[^"]+)" id="export"', page.text)
    assert link
    export = client.get(html_module.unescape(link.group(1)))
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    assert "attachment" in export.headers["content-disposition"]
    rows = export.text.splitlines()
    assert rows[0].startswith("day,events,") and len(rows) == 8
    today_row = dict(zip(rows[0].split(","), rows[-1].split(","), strict=True))
    assert today_row["day"] == today.isoformat() and today_row["events"] == "4"
    assert today_row["currency_spent"] == "15" and today_row["currency_adjusted"] == "40"
    # a range the rollups refuse, answered as a page
    wrong = client.get(
        "/console/reports", params={"from": today.isoformat(), "to": first.isoformat()}
    )
    assert wrong.status_code == 422 and "`to` is before `from`" in wrong.text
    assert client.get("/console/reports/export.csv", follow_redirects=False).status_code == 200
    client.cookies.clear()
    assert client.get("/console/reports/export.csv", follow_redirects=False).status_code == 303


def test_rules_dry_run_shows_the_difference_before_anything_is_saved(
    console: tuple[TestClient, str],
    db: Database,
    clock: Clock,
    make_key: Callable[..., dict[str, str]],
) -> None:
    import json

    from tests.conftest import drain_pipeline

    client, csrf = console
    now = clock()
    events = [
        {"event_id": f"g{i}", "user_id": f"p{i % 2}", "type": "played_game"}
        | {"occurred_at": now.isoformat()}
        for i in range(4)
    ]
    ingest = make_key("ingest", "gamesite")
    assert (
        client.post("/v1/ingress/batches", json={"events": events}, headers=ingest).status_code
        == 202
    )
    drain_pipeline(db, client.app.state.container.accounts.app)  # type: ignore[attr-defined]
    page = client.get("/console/rules").text
    text = re.search(r'<textarea id="rules-text"[^>]*>([^<]*)</textarea>', page, re.S)
    assert text
    wire = json.loads(html_module.unescape(text.group(1)))
    for rule in wire["rules"]:
        if rule["event_type"] == "played_game":
            rule["currency"] = 8  # 5 -> 8 per game
    today = now.date().isoformat()
    form = {"csrf": csrf, "rules": json.dumps(wire, indent=2), "from": today, "through": today}
    answer = client.post("/console/rules/dry-run", data=form, headers={"HX-Request": "true"})
    assert answer.status_code == 200, answer.text
    assert "4 retained events of 2 members: 2 would be awarded differently" in answer.text
    totals = re.search(r'<th scope="row">currency</th>(.*?)</tr>', answer.text, re.S)
    assert totals and re.findall(r'class="num">([^<]+)<', totals.group(1)) == ["20", "32", "12"]
    assert "played_game" in answer.text and "Nothing was saved." in answer.text
    assert 'id="rules-version">1<' in client.get("/console/rules").text  # not saved
    # without JavaScript: the whole page, the editor keeping the candidate
    full = client.post("/console/rules/dry-run", data=form)
    assert full.status_code == 200 and 'id="dry-run-summary"' in full.text
    assert "&#34;currency&#34;: 8" in full.text or "&quot;currency&quot;: 8" in full.text
    # errors: invalid rules at their line, a period outside retention
    wire["ranks"][0]["name"] = ""
    broken = {**form, "rules": json.dumps(wire, indent=2)}
    refused = client.post("/console/rules/dry-run", data=broken, headers={"HX-Request": "true"})
    assert refused.status_code == 422 and "<code>ranks[0].name</code>" in refused.text
    assert 'data-line="' in refused.text
    old = {**form, "from": "2000-01-01"}
    refused = client.post("/console/rules/dry-run", data=old, headers={"HX-Request": "true"})
    assert refused.status_code == 422 and "outside retention" in refused.text


def test_history_awards_are_explained_in_place(
    console: tuple[TestClient, str],
    db: Database,
    clock: Clock,
    make_key: Callable[..., dict[str, str]],
) -> None:
    from loyalty.bootstrap import build_projection
    from tests.conftest import drain_pipeline

    client, _csrf = console
    events = [
        {"event_id": f"w{i}", "user_id": "winner", "type": "played_game"}
        | {"occurred_at": clock().isoformat(), "attributes": {"result": "win" if i else "loss"}}
        for i in range(3)
    ]
    ingest = make_key("ingest", "gamesite")
    assert (
        client.post("/v1/ingress/batches", json={"events": events}, headers=ingest).status_code
        == 202
    )
    container = client.app.state.container  # type: ignore[attr-defined]
    drain_pipeline(db, container.accounts.app)
    build_projection(db, container.accounts.app).catch_up()
    page = client.get("/console/members", params={"user_id": "winner"}).text
    link = re.search(r'hx-get="(/console/members/explain\?[^"]+)"', page)
    assert link and "award_id=w" in link.group(1)
    why = client.get(html_module.unescape(link.group(1)), headers={"HX-Request": "true"})
    assert why.status_code == 200
    assert "played_game" in why.text and "3</td>" in why.text  # 3 events of the type
    assert "×2" in why.text  # the win multiplier, applied to 2 of them
    assert re.search(r'<th scope="row">Currency</th>.*?class="num">25<', why.text, re.S)
    missing = client.get(
        "/console/members/explain", params={"user_id": "winner", "award_id": "nope"}
    )
    assert missing.status_code == 404 and "award" in missing.text


def test_member_page_shows_expiring_currency_under_the_rules(
    console: tuple[TestClient, str], clock: Clock
) -> None:
    import calendar
    import json

    client, csrf = console
    page = client.get("/console/rules").text
    text = re.search(r'<textarea id="rules-text"[^>]*>([^<]*)</textarea>', page, re.S)
    assert text
    wire = json.loads(html_module.unescape(text.group(1)))
    wire["currency_expiry"] = {"after_months": 1}
    saved = client.post(
        "/console/rules", data={"csrf": csrf, "rules": json.dumps(wire), "confirm": "yes"}
    )
    assert "Saved as version 2." in saved.text
    status, html = act(
        client,
        csrf,
        "adjust",
        user_id="saver",
        adjustment_id="x",
        currency="70",
        rank_points="0",
        reason="welcome",
    )
    assert status == 200
    now = clock()
    month, year = (now.month % 12) + 1, now.year + (now.month == 12)
    last = calendar.monthrange(year, month)[1]
    expected = f"70 at the end of <time>{year:04d}-{month:02d}-{last:02d}</time>"
    assert expected in html  # earned this month, expires at the end of next month


def test_member_forms_are_the_apis_commands_with_the_apis_bounds(
    console: tuple[TestClient, str], db: Database
) -> None:
    """#27: the console's forms go through the API's models (SpendRequest,
    RefundRequest, AdjustmentRequest): amounts past +-10**12, integers beyond 64 bits and
    control characters are refused with a 422 naming the field; nothing is stored."""
    client, csrf = console
    adjust = {"user_id": "bob", "adjustment_id": "a1", "currency": "1", "rank_points": "0"}
    refused = [
        ({**adjust, "currency": "10000000000000"}, "currency"),
        ({**adjust, "currency": "9223372036854775808"}, "currency"),
        ({**adjust, "rank_points": str(10**30)}, "rank points"),
        ({**adjust, "rank_points": "10**30"}, "rank points"),
        ({**adjust, "adjustment_id": "a\x00b"}, "adjustment id"),
        ({**adjust, "adjustment_id": "a\x07"}, "adjustment id"),
        ({**adjust, "reason": "why\x00"}, "reason"),
        ({**adjust, "reason": "x" * 257}, "reason"),
    ]
    for form, field in refused:
        form.setdefault("reason", "test")
        status, html = act(client, csrf, "adjust", **form)
        assert status == 422, (form, html)
        assert message(html).startswith(f"{field}: "), message(html)
    status, html = act(client, csrf, "spend", user_id="bob", order_id="o\x01", amount="1")
    assert status == 422 and message(html).startswith("order id: ")
    status, html = act(client, csrf, "refund", user_id="bob", order_id="o\x00")
    assert status == 422 and message(html).startswith("order id: ")
    with db.read() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM member_balances")).scalar_one()
    assert count == 0
    status, html = act(client, csrf, "adjust", **adjust, reason="welcome")
    assert status == 200 and balance(html) == 1


def test_the_rules_editor_refuses_duplicate_keys_like_put_rules(
    console: tuple[TestClient, str],
) -> None:
    """#27: one reading of a rules document (duplicate keys refused, as PUT /v1/rules)."""
    client, csrf = console
    doubled = '{"rules": [], "rules": [], "ranks": [{"name": "bronze", "min_rank_points": 0}]}'
    saved = client.post("/console/rules", data={"csrf": csrf, "rules": doubled})
    assert saved.status_code == 422 and "repeats a key" in saved.text
    dry = client.post(
        "/console/rules/dry-run",
        data={"csrf": csrf, "rules": doubled, "from": "2026-11-01", "through": "2026-11-02"},
    )
    assert dry.status_code == 422 and "repeats a key" in dry.text
    assert 'id="rules-version">1<' in client.get("/console/rules").text


def test_dates_and_integers_out_of_range_are_a_4xx_naming_the_field(
    console: tuple[TestClient, str],
) -> None:
    """#27: every date and integer of a page is bounded at the edge (a 422 naming the
    field, never a 500 from date arithmetic or a 64-bit column)."""
    client, csrf = console
    for params, field in [
        ({"from": "9999-12-31", "to": "9999-12-31"}, "from"),
        ({"to": "0001-01-05"}, "to"),
        ({"from": "0001-01-01"}, "from"),
        ({"from": "2026-02-30"}, "from"),
    ]:
        for path in ("/console/reports", "/console/reports/export.csv"):
            answer = client.get(path, params=params)
            assert answer.status_code == 422, (path, params)
            assert field in answer.text
    rules = client.get("/console/rules").text
    text = re.search(r'<textarea id="rules-text"[^>]*>([^<]*)</textarea>', rules, re.S)
    assert text
    current = html_module.unescape(text.group(1))
    for period, field in [
        ({"from": "2026-11-01", "through": "9999-12-31"}, "through"),
        ({"from": "9999-12-31", "through": "9999-12-31"}, "from"),
        ({"from": "0001-01-01", "through": "2026-11-01"}, "from"),
        ({"from": "", "through": "2026-11-01"}, "from"),
    ]:
        answer = client.post(
            "/console/rules/dry-run",
            data={"csrf": csrf, "rules": current, **period},
            headers={"HX-Request": "true"},
        )
        assert answer.status_code == 422, (period, answer.text)
        assert field in answer.text
    for version in ("99999999999999999999", "9223372036854775808", "-1"):
        answer = client.get(f"/console/rules/versions/{version}")
        assert answer.status_code == 422 and "version" in answer.text


def test_irreversible_actions_show_what_will_happen_before_doing_it(
    console: tuple[TestClient, str], operator: str, db: Database
) -> None:
    """#27: erase, save rules and revoke (your own key included) first answer a
    confirmation page saying what will happen; only its confirmed form acts."""
    client, csrf = console
    adjust = {"adjustment_id": "c1", "currency": "12", "rank_points": "0", "reason": "r"}
    assert act(client, csrf, "adjust", user_id="carl", **adjust)[0] == 200

    def effects(html: str) -> str:
        found = re.search(r'<ul id="confirm-effects">(.*?)</ul>', html, re.S)
        assert found, html
        return html_module.unescape(found.group(1))

    # erase
    asked = client.post("/console/forget", data={"csrf": csrf, "user_id": "carl"})
    assert asked.status_code == 200 and "cannot be undone" in asked.text
    assert "12 currency" in effects(asked.text)
    assert 'name="confirm" value="yes"' in asked.text and 'value="carl"' in asked.text
    assert client.get("/console/forget").text.count("<code>") == 0  # no request made
    # save rules
    page = client.get("/console/rules").text
    text = re.search(r'<textarea id="rules-text"[^>]*>([^<]*)</textarea>', page, re.S)
    assert text
    wire = json.loads(html_module.unescape(text.group(1)))
    wire["rules"] = [r for r in wire["rules"] if r["event_type"] != "logged_on"]
    asked = client.post("/console/rules", data={"csrf": csrf, "rules": json.dumps(wire)})
    assert asked.status_code == 200
    assert "version 2" in effects(asked.text)
    assert "removed (no longer earn): logged_on" in effects(asked.text)
    assert 'id="rules-version">1<' in client.get("/console/rules").text  # not saved
    done = client.post(
        "/console/rules", data={"csrf": csrf, "rules": json.dumps(wire), "confirm": "yes"}
    )
    assert done.status_code == 200 and "Saved as version 2." in done.text
    # revoke another key, then your own
    other = KeyStore(db).create(Role.SHOP, "till")
    other_id = other.split("_")[1]
    asked = client.post(f"/console/keys/{other_id}/revoke", data={"csrf": csrf})
    assert asked.status_code == 200 and "till, shop" in effects(asked.text)
    assert "you signed in with" not in effects(asked.text)
    assert KeyStore(db).verify(other) is not None  # still active
    own_id = operator.split("_")[1]
    asked = client.post(f"/console/keys/{own_id}/revoke", data={"csrf": csrf})
    assert "the key you signed in with" in effects(asked.text)
    assert client.get("/console/keys", follow_redirects=False).status_code == 200  # still in


def test_support_refunds_a_shops_order_picked_from_the_history(
    console: tuple[TestClient, str], make_key: Callable[..., dict[str, str]]
) -> None:
    """#27: the console's Refund answered order_not_found for a shop's order shown in
    the member's history. Now it refunds it (the one source with that order id, or the
    one named), in full, recording the operator."""
    client, csrf = console
    adjust = {"adjustment_id": "d1", "currency": "50", "rank_points": "0", "reason": "r"}
    assert act(client, csrf, "adjust", user_id="dora", **adjust)[0] == 200
    for name, order in (("webshop", "o-1"), ("webshop", "o-2"), ("till", "o-2")):
        spent = client.post(
            "/v1/members/dora/spend",
            json={"order_id": order, "amount": 10},
            headers=make_key("shop", name),
        )
        assert spent.status_code == 200
    container = client.app.state.container  # type: ignore[attr-defined]
    from loyalty.bootstrap import build_projection

    build_projection(container.db, container.accounts.app).catch_up()
    page = client.get("/console/members", params={"user_id": "dora"}).text
    # from the history
    assert 'aria-label="Refund order o-1 of webshop: what is left of it"' in page
    assert 'aria-label="Refund order o-2 of till: what is left of it"' in page
    status, html = act(client, csrf, "refund", user_id="dora", order_id="o-1")
    assert status == 200, html
    assert message(html) == "refunded 10 of order o-1 (placed by webshop; refunded by ops-alice)"
    assert balance(html) == 30
    status, html = act(client, csrf, "refund", user_id="dora", order_id="o-2")
    assert status == 409 and "webshop" in message(html) and "till" in message(html)
    status, html = act(client, csrf, "refund", user_id="dora", order_id="o-2", source="till")
    assert status == 200 and balance(html) == 40


def test_the_dashboards_today_is_the_daily_reports_today_with_the_same_labels(
    console: tuple[TestClient, str],
    db: Database,
    clock: Clock,
    make_key: Callable[..., dict[str, str]],
) -> None:
    """#33 item 1: one definition and one source of today's figures: after the same
    traffic the dashboard shows what GET /v1/reports/daily answers for today, under the
    labels the reports page uses."""
    from loyalty.application.reporting import FIGURE_LABELS, TODAY_FIGURES
    from loyalty.bootstrap import build_projection
    from loyalty.console.rendering import figure
    from tests.conftest import drain_pipeline, earlier_today

    client, csrf = console
    now = clock()
    kinds = ["logged_on", "played_game", "made_purchase"]
    events = [
        {"event_id": f"d{i}", "user_id": f"u{i % 4}", "type": kinds[i % 3]}
        | {"occurred_at": earlier_today(now, timedelta(minutes=i)).isoformat()}
        for i in range(30)
    ]
    ingest = make_key("ingest", "gamesite")
    answer = client.post("/v1/ingress/batches", json={"events": events}, headers=ingest)
    assert answer.status_code == 202
    container = client.app.state.container  # type: ignore[attr-defined]
    drain_pipeline(db, container.accounts.app)
    build_projection(db, container.accounts.app).catch_up()
    act(client, csrf, "spend", user_id="u0", order_id="o", amount="1")
    build_projection(db, container.accounts.app).catch_up()
    today = now.date().isoformat()
    api = client.get(
        "/v1/reports/daily", params={"from": today, "to": today}, headers=make_key("operator")
    )
    assert api.status_code == 200, api.text
    day = api.json()["days"][0]
    assert day["currency_spent"] == 1 and day["events"] == 30, (answer.json(), day)
    live = client.get("/console/dashboard/live").text
    shown = {
        m.group(1): (html_module.unescape(m.group(2)), m.group(3).strip())
        for m in re.finditer(
            r"<dt>([^<]*)</dt><dd id=\"today-([a-z_]+)\" data-field=\"[a-z_]+\">([^<]*)", live
        )
    }
    assert [v[0] for v in shown.values()] == list(TODAY_FIGURES)
    for label, (field, value) in shown.items():
        assert label == FIGURE_LABELS[field]
        assert value == figure(day[field]), field
    page = client.get("/console/reports", params={"from": today, "to": today}).text
    for field in TODAY_FIGURES:
        header = f'<th scope="col" data-field="{field}" class="num">{FIGURE_LABELS[field]}</th>'
        assert header in page, field
        assert f'<td class="num" data-field="{field}">{figure(day[field])}</td>' in page


def test_the_apis_report_titles_each_figure_with_the_consoles_label(client: TestClient) -> None:
    """#33 item 1: the API's report names its figures as the console does."""
    from loyalty.application.reporting import FIGURE_LABELS

    schema = client.get("/openapi.json").json()["components"]["schemas"]["DayBody"]
    titles = {k: v.get("title") for k, v in schema["properties"].items() if k in FIGURE_LABELS}
    assert titles == {k: v for k, v in FIGURE_LABELS.items() if k in titles}
    assert titles["currency_credited"] == "Currency credited (whole units)"


def test_storage_and_receipts_name_locations_for_an_operator(
    console: tuple[TestClient, str], db: Database
) -> None:
    """#33 item 9: member data is not 'other'; each location has a name an operator
    understands with its table as the detail; bytes with thousands separators."""
    from loyalty.adapters.erasure_store import LOCATIONS
    from loyalty.adapters.storage import TABLE_NAMES, storage_report

    client, csrf = console
    if db.backend == "postgresql":  # the dedup keys' current generation (ingest makes it)
        from loyalty.adapters.ingress_log import PostgresIngressLog

        PostgresIngressLog(db).ensure_partitions(set())
    report = storage_report(db)
    kinds = {loc.name: loc.kind for loc in report.locations}
    assert kinds["award_explanations"] == "read_model"
    assert kinds["projection_quarantine"] == "read_model"
    unnamed = [loc.name for loc in report.locations if loc.name not in TABLE_NAMES]
    # day partitions (of the ingress and of the caps) and the dedup keys' generations are
    # named by their days
    assert not [
        n
        for n in unnamed
        if not n.startswith(("ingress_events_", "ingress_keys_g", "pipeline_caps_"))
    ]
    caps = [loc for loc in report.locations if loc.name.startswith("pipeline_caps_")]
    assert all(c.label.startswith("Daily cap counters, ") for c in caps)
    generations = [loc for loc in report.locations if loc.name.startswith("ingress_keys_g")]
    if db.backend == "postgresql":
        assert generations and all(
            g.label.startswith("Ingest duplicate check, received from ") for g in generations
        )
    assert [loc.name for loc in report.locations if loc.kind == "other"] == []
    live = client.get("/console/dashboard/live").text
    row = re.search(
        r"<tr><td>Award explanations</td><td>([^<]*)</td><td><code>award_explanations</code>", live
    )
    assert row and row.group(1) == "member data (read models)"
    big = max(report.locations, key=lambda loc: loc.bytes)
    assert big.bytes >= 1000 and f">{big.bytes:,}</td>" in live

    user = "forget-names-1"
    act(
        client,
        csrf,
        "adjust",
        user_id=user,
        adjustment_id="a",
        currency="5",
        rank_points="0",
        reason="x",
    )
    answer = client.post(
        "/console/forget",
        data={"csrf": csrf, "user_id": user, "confirm": "yes"},
        follow_redirects=False,
    )
    client.app.state.container.forget.run_pending()  # type: ignore[attr-defined]
    done = client.get(answer.headers["location"]).text
    erased = done.split('id="erased"')[1].split("</table>")[0]
    for location in ("pipeline_caps", "projection_quarantine"):
        assert location in LOCATIONS
        assert re.search(rf"<td>[A-Z][a-z][^<_]*</td><td><code>{location}</code></td>", erased)


def test_the_keys_page_marks_your_own_key_and_warns_of_a_second_name(
    console: tuple[TestClient, str], operator: str
) -> None:
    """#33 item 6: the session's own key is marked; a second active key of a name is
    created with a warning naming the first."""
    client, csrf = console
    page = client.get("/console/keys").text
    own = re.search(r"<code>([0-9a-f]{16})</code> <strong[^>]*id=\"own-key\"", page)
    assert own and own.group(1) == operator.split("_")[1]
    assert page.count('id="own-key"') == 1
    first = client.post("/console/keys", data={"csrf": csrf, "role": "shop", "name": "till-9"})
    assert first.status_code == 200 and 'id="key-warning"' not in first.text
    second = client.post("/console/keys", data={"csrf": csrf, "role": "shop", "name": "till-9"})
    assert second.status_code == 200 and 'id="new-key"' in second.text
    warning = re.search(r'id="key-warning">([^<]*)<', second.text)
    assert warning and "another active key is named till-9" in warning.group(1)


def test_the_keys_page_shows_when_each_key_was_last_used(
    console: tuple[TestClient, str], db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    """#33 item 6: last-used time per key (to the minute), 'never' before any use."""
    client, _csrf = console
    used = make_key("shop", "till-used")
    KeyStore(db).create(Role.SHOP, "till-unused")
    assert client.get("/v1/members/nobody", headers=used).status_code == 404
    page = client.get("/console/keys").text

    def row_of(name: str) -> str:
        found = re.search(rf"<td>{name}</td>.*?</tr>", page, re.S)
        assert found, name
        return found.group(0)

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert re.search(rf'class="last-used">{today} \d\d:\d\d<', row_of("till-used"))
    assert 'class="last-used">never<' in row_of("till-unused")
