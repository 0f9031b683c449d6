"""Logs never contain user ids or keys: every path is driven with a marker user id, and
the captured logs (in process at DEBUG, and a live JSON-logging server) are searched."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.config import Settings
from loyalty.observability import JsonFormatter, RequestIdFilter
from tests.conftest import drain_with
from tests.e2e.live import create_key, serve_process, wait_for

CLIENT_LOGGERS = ("httpx", "httpcore")  # the test's own HTTP client logs its URLs


class _ServerSide(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(CLIENT_LOGGERS)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(_ServerSide())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)


def drive(http: httpx.Client | TestClient, keys: dict[str, str], marker: str) -> None:
    """Every path that sees a user id, with the marker as the user id."""

    def h(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[role]}", "X-Request-ID": f"req-{role}"}

    now = datetime.now(UTC)
    events = [
        {"event_id": f"{marker}-e{i}", "user_id": marker, "type": t, "occurred_at": now.isoformat()}
        for i, t in enumerate(["logged_on", "played_game", "joined_competition"])
    ]
    old = (now - timedelta(days=30)).isoformat()
    events.append({"event_id": "old", "user_id": marker, "type": "logged_on", "occurred_at": old})
    assert (
        http.post("/v1/ingress/batches", json={"events": events}, headers=h("ingest")).status_code
        == 202
    )
    http.post("/v1/ingress/batches", json={"events": events}, headers=h("ingest"))  # duplicates
    bad = {"events": [{"event_id": "x", "user_id": marker, "type": "BAD", "occurred_at": "x"}]}
    assert http.post("/v1/ingress/batches", json=bad, headers=h("ingest")).status_code == 422
    assert http.get(f"/v1/members/{marker}-nobody", headers=h("shop")).status_code == 404
    adjust = {"adjustment_id": "a1", "currency": 100, "rank_points": 5, "reason": "goodwill"}
    assert (
        http.post(
            f"/v1/members/{marker}/adjustments", json=adjust, headers=h("operator")
        ).status_code
        == 200
    )
    spend = {"order_id": f"{marker}-o1", "amount": 10}
    assert (
        http.post(f"/v1/members/{marker}/spend", json=spend, headers=h("shop")).status_code == 200
    )
    big = {"order_id": f"{marker}-o2", "amount": 10**9}
    assert http.post(f"/v1/members/{marker}/spend", json=big, headers=h("shop")).status_code == 409
    refund = {"order_id": f"{marker}-o1"}
    assert (
        http.post(f"/v1/members/{marker}/refunds", json=refund, headers=h("shop")).status_code
        == 200
    )
    assert http.get(f"/v1/members/{marker}", headers=h("shop")).status_code == 200
    assert http.get(f"/v1/members/{marker}/history", headers=h("shop")).status_code in (200, 404)
    assert http.get("/v1/leaderboard", headers=h("shop")).status_code == 200
    assert http.get("/v1/pipeline", headers=h("operator")).status_code == 200
    wrong = {"Authorization": f"Bearer {keys['shop']}"}
    assert http.get("/v1/pipeline", headers=wrong).status_code == 403
    bad_key = {"Authorization": f"Bearer {keys['shop']}x"}
    assert http.get(f"/v1/members/{marker}", headers=bad_key).status_code == 401


def secrets_of(keys: dict[str, str]) -> list[str]:
    # a key is lk_<key id, hex>_<secret, url-safe base64 that may itself hold "_">
    return [part for key in keys.values() for part in (key, key.split("_", 2)[2])]


def test_in_process_logs_hold_no_user_id_or_key(
    client: TestClient,
    make_key: Callable[..., dict[str, str]],
    db: Database,
    captured: io.StringIO,
) -> None:
    from loyalty.bootstrap import build_pipeline, build_projection

    marker = f"marker-{uuid.uuid4().hex}"
    headers = {role: make_key(role, f"{role}-src") for role in ("ingest", "shop", "operator")}
    keys = {r: v["Authorization"].removeprefix("Bearer ") for r, v in headers.items()}
    logging.getLogger("loyalty.test").info("capture works")
    drive(client, keys, marker)
    container = client.app.state.container  # type: ignore[attr-defined]
    # until nothing is pending: a writing transaction elsewhere on the server (another
    # xdist worker) may hide new rows from one pass (tests/conftest.py drain_pipeline)
    drain_with(build_pipeline(db, container.accounts.app), db, record=False)
    build_projection(db, container.accounts.app).catch_up()
    assert client.get(f"/v1/members/{marker}/history", headers=headers["shop"]).status_code == 200
    text = captured.getvalue()
    assert "capture works" in text
    assert marker not in text
    for secret in secrets_of(keys):
        assert secret not in text


def test_live_server_json_logs_hold_no_user_id_or_key(settings: Settings, tmp_path: Path) -> None:
    url = settings.database_url
    marker = f"marker-{uuid.uuid4().hex}"
    keys = {role: create_key(url, role, f"{role}-src") for role in ("ingest", "shop", "operator")}
    log_path = tmp_path / "serve.log"
    # awards recorded at once (no interval), so that the pipeline's and the projection's
    # log lines about the member are in the log before it is read
    with serve_process(
        url,
        log=log_path,
        stop_timeout=30,
        LOYALTY_LOG_FORMAT="json",
        LOYALTY_AWARD_INTERVAL_SECONDS="0",
    ) as server:
        with httpx.Client(base_url=server.base, timeout=30) as http:
            drive(http, keys, marker)

            def awarded() -> bool:
                found = http.get(
                    f"/v1/members/{marker}/history",
                    headers={"Authorization": f"Bearer {keys['shop']}"},
                )
                return found.status_code == 200 and any(
                    e["kind"] == "award" for e in found.json()["entries"]
                )

            wait_for(awarded, 30, "the member's award in the history (pipeline, projection)")
            echoed = http.get("/healthz", headers={"X-Request-ID": "trace-me-1"})
            assert echoed.headers["x-request-id"] == "trace-me-1"
    lines = log_path.read_text().splitlines()
    assert lines, "the server logged nothing"
    for line in lines:
        entry = json.loads(line)  # every line is one JSON object
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), line
    text = "\n".join(lines)
    assert "Uvicorn running" in text  # uvicorn's own lines are JSON too
    assert marker not in text
    for secret in secrets_of(keys):
        assert secret not in text


def test_console_requests_log_no_user_id_or_key(
    client: TestClient, db: Database, captured: io.StringIO
) -> None:
    """The operator console (sign-in, member lookup, every member action, an error,
    forget-me) at DEBUG in process: neither the member's id nor the key is logged."""
    import re

    from loyalty.adapters.keys import KeyStore
    from loyalty.application.access import Role

    marker = f"marker-{uuid.uuid4().hex}"
    key = KeyStore(db).create(Role.OPERATOR, "ops")
    form = client.get("/console/sign-in").text
    token = re.search(r'name="csrf" value="([^"]+)"', form)
    assert token is not None
    client.post("/console/sign-in", data={"csrf": token.group(1), "key": key})
    page = client.get("/console/members", params={"user_id": marker}).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    member = {"csrf": csrf.group(1), "user_id": marker}
    adjust = {"adjustment_id": "a", "currency": "10", "rank_points": "1", "reason": "r"}
    assert client.post("/console/members/adjust", data={**member, **adjust}).status_code == 200
    spend = {"order_id": "o", "amount": "1000"}
    assert client.post("/console/members/spend", data={**member, **spend}).status_code == 409
    # the confirmation page first (it shows the account), then the confirmed request
    assert client.post("/console/forget", data=member).status_code == 200
    confirmed = {**member, "confirm": "yes"}
    assert client.post("/console/forget", data=confirmed, follow_redirects=False).status_code == 303
    client.app.state.container.forget.run_pending()  # type: ignore[attr-defined]
    text = captured.getvalue()
    assert "forget request" in text and "completed" in text  # the capture saw the work
    assert marker not in text
    for secret in secrets_of({"operator": key}):
        assert secret not in text


def test_live_webhook_deliveries_log_no_url(settings: Settings) -> None:
    """A live server delivers to a receiver whose URL holds a token (path and query), the
    first attempts failing: its log (INFO, text) names no part of the URL."""
    from tests.e2e.live import serve_logged
    from tests.e2e.test_webhooks import Receiver

    token = f"tok{uuid.uuid4().hex}"
    receiver = Receiver(lambda _b, _h, attempt: 500 if attempt <= 2 else 200)
    url = receiver.url.replace("/hook", f"/hooks/{token}-path?secret={token}-query")
    operator = create_key(settings.database_url, "operator", "ops")
    headers = {"Authorization": f"Bearer {operator}"}
    try:
        with serve_logged(
            settings.database_url,
            LOYALTY_WEBHOOK_ALLOW_PRIVATE_URLS="true",
            LOYALTY_WEBHOOK_RETRY_SECONDS="60",
        ) as (base, output):
            with httpx.Client(base_url=base, timeout=30) as http:
                created = http.post("/v1/webhooks", json={"url": url}, headers=headers)
                assert created.status_code == 201, created.text
                adjust = {"adjustment_id": "a1", "currency": 5, "rank_points": 0, "reason": "r"}
                done = http.post("/v1/members/hooked/adjustments", json=adjust, headers=headers)
                assert done.status_code == 200, done.text
                deadline = time.monotonic() + 60
                while len(receiver.bodies()) < 2:  # member.created, member.adjusted
                    assert time.monotonic() < deadline, output()
                    time.sleep(0.2)
            text = output()
    finally:
        receiver.close()
    assert receiver.attempts and max(receiver.attempts.values()) >= 3
    assert text.strip(), "the server logged nothing"
    assert token not in text
    assert receiver.url.rsplit("/", 1)[0] not in text  # not even scheme://host:port
