"""GET /metrics: present without auth, and moving after traffic (create_app), and the
worker's own metrics server (``loyalty worker --metrics-port``)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from loyalty.adapters.db import Database
from loyalty.api.app import create_app
from loyalty.api.deps import Container
from loyalty.bootstrap import build_pipeline, build_projection, build_worker
from loyalty.config import Settings
from tests.conftest import Clock, drain_with
from tests.e2e.live import LOYALTY, env_for, free_port, serve_process

Headers = dict[str, str]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0.0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


METRICS_TOKEN = "metrics-test-token"


@pytest.fixture
def client(settings: Settings, db: Database, clock: Clock) -> Iterator[TestClient]:
    """The API with GET /metrics exposed (behind LOYALTY_METRICS_TOKEN)."""
    exposed = settings.model_copy(update={"metrics_token": SecretStr(METRICS_TOKEN)})
    with TestClient(create_app(exposed, db=db, clock=clock)) as test_client:
        yield test_client


def scrape(client: TestClient) -> str:
    resp = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text


def container_of(client: TestClient) -> Container:
    return client.app.state.container  # type: ignore[attr-defined,no-any-return]


def test_metrics_need_no_key_and_list_every_family(client: TestClient) -> None:
    text = scrape(client)
    for name in (
        "loyalty_http_requests_total",
        "loyalty_http_request_duration_seconds",
        "loyalty_ingest_events_total",
        "loyalty_ingest_batches_total",
        "loyalty_pipeline_events_processed_total",
        "loyalty_pipeline_awards_total",
        "loyalty_pipeline_oldest_pending_age_seconds",
        "loyalty_pipeline_pending_events",
        "loyalty_account_commands_total",
        "loyalty_currency_spent_total",
        "loyalty_projection_lag_events",
        "loyalty_retention_partitions_dropped_total",
        "loyalty_retention_kept_unprocessed_partitions",
        "loyalty_forget_requests_total",
        "process_cpu_seconds_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')} " in text or f"# TYPE {name} " in text, name


def test_metrics_move_with_traffic(
    client: TestClient, make_key: Callable[..., Headers], db: Database, clock: object
) -> None:
    ingest, shop, operator = (
        make_key("ingest", "games"),
        make_key("shop", "web"),
        make_key("operator", "ops"),
    )
    now = datetime.now(UTC)
    events = [
        {"event_id": "e1", "user_id": "m1", "type": "logged_on", "occurred_at": now.isoformat()},
        {"event_id": "e2", "user_id": "m1", "type": "played_game", "occurred_at": now.isoformat()},
        {"event_id": "e2", "user_id": "m1", "type": "played_game", "occurred_at": now.isoformat()},
        {
            "event_id": "e3",
            "user_id": "m2",
            "type": "logged_on",
            "occurred_at": (now - timedelta(days=30)).isoformat(),
        },
    ]
    first = client.post("/v1/ingress/batches", json={"events": events}, headers=ingest)
    again = client.post("/v1/ingress/batches", json={"events": events[:2]}, headers=ingest)
    assert first.status_code == again.status_code == 202
    assert client.post("/v1/ingress/batches", json={"events": []}).status_code == 401
    text = scrape(client)
    assert metric(text, "loyalty_ingest_events_total", source="games", outcome="accepted") == 2
    assert metric(text, "loyalty_ingest_events_total", source="games", outcome="duplicate") == 3
    assert metric(text, "loyalty_ingest_events_total", source="games", outcome="rejected") == 1
    assert metric(text, "loyalty_ingest_batches_total", source="games") == 2
    route = {"method": "POST", "route": "/v1/ingress/batches"}
    assert metric(text, "loyalty_http_requests_total", **route, status="202") == 2
    assert metric(text, "loyalty_http_requests_total", **route, status="401") == 1
    assert metric(text, "loyalty_http_request_duration_seconds_count", **route, status="202") == 2

    # the pipeline and the projection, in this process, reporting to the app's registry
    container = container_of(client)
    pipeline = build_pipeline(db, container.accounts.app, metrics=container.metrics)
    assert drain_with(pipeline, db) == 2  # (other sessions may hide rows for a pass)
    projection = build_projection(db, container.accounts.app, metrics=container.metrics)
    assert projection.catch_up() > 0
    worker = build_worker(db, [0], container.accounts.app, metrics=container.metrics)
    worker._sample_lag()

    member = client.get("/v1/members/m1", headers=shop)
    assert member.status_code == 200
    spent = client.post("/v1/members/m1/spend", json={"order_id": "o1", "amount": 3}, headers=shop)
    assert spent.status_code == 200
    replay = client.post("/v1/members/m1/spend", json={"order_id": "o1", "amount": 3}, headers=shop)
    assert replay.status_code == 200
    broke = client.post(
        "/v1/members/m1/spend", json={"order_id": "o2", "amount": 10**9}, headers=shop
    )
    assert broke.status_code == 409
    refund = client.post("/v1/members/m1/refunds", json={"order_id": "o1"}, headers=shop)
    assert refund.status_code == 200
    assert client.get("/v1/members/nobody", headers=shop).status_code == 404
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/v1/pipeline", headers=operator).status_code == 200

    text = scrape(client)
    assert metric(text, "loyalty_pipeline_events_processed_total") == 2
    assert metric(text, "loyalty_pipeline_awards_total") == 1
    assert metric(text, "loyalty_pipeline_windows_total") >= 1
    assert metric(text, "loyalty_pipeline_pending_events") == 0
    assert metric(text, "loyalty_pipeline_oldest_pending_age_seconds") == 0
    assert metric(text, "loyalty_projection_position", projection="members") > 0
    assert metric(text, "loyalty_projection_lag_events", projection="members") == 0
    assert metric(text, "loyalty_projection_events_applied_total", projection="members") > 0
    commands = "loyalty_account_commands_total"
    assert metric(text, commands, command="spend", outcome="applied") == 1
    assert metric(text, commands, command="spend", outcome="replayed") == 1
    assert metric(text, commands, command="spend", outcome="insufficient_funds") == 1
    assert metric(text, commands, command="refund", outcome="applied") == 1
    assert metric(text, "loyalty_currency_spent_total") == 3
    assert metric(text, "loyalty_currency_refunded_total") == 3
    member_route = {"method": "GET", "route": "/v1/members/{user_id}"}
    assert metric(text, "loyalty_http_requests_total", **member_route, status="200") == 1
    assert metric(text, "loyalty_http_requests_total", **member_route, status="404") == 1
    assert metric(text, "loyalty_http_requests_total", route="unmatched", status="404") == 1
    assert "m1" not in text and "nobody" not in text  # never a user id in a label


def test_pipeline_lag_is_reported_while_events_wait(
    client: TestClient, make_key: Callable[..., Headers], db: Database
) -> None:
    now = datetime.now(UTC).isoformat()
    batch = {
        "events": [{"event_id": "w1", "user_id": "u", "type": "logged_on", "occurred_at": now}]
    }
    assert client.post("/v1/ingress/batches", json=batch, headers=make_key()).status_code == 202
    container = container_of(client)
    time.sleep(0.05)
    worker = build_worker(db, [], container.accounts.app, metrics=container.metrics)
    worker._sample_lag()  # owns no shard: the event stays pending
    text = scrape(client)
    assert metric(text, "loyalty_pipeline_pending_events") == 1
    assert metric(text, "loyalty_pipeline_oldest_pending_age_seconds") > 0


def test_two_apps_have_separate_registries(settings: Settings, db: Database) -> None:
    exposed = settings.model_copy(update={"metrics_token": SecretStr(METRICS_TOKEN)})
    with (
        TestClient(create_app(exposed, db=db)) as one,
        TestClient(create_app(exposed, db=db)) as two,
    ):
        one.get("/healthz")
        assert metric(scrape(one), "loyalty_http_requests_total", route="/healthz") == 1
        assert metric(scrape(two), "loyalty_http_requests_total", route="/healthz") == 0


def test_worker_serves_metrics_on_its_port(settings: Settings, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    for _attempt in range(3):  # a free port taken by another process before the worker bound it
        port = free_port()
        log = log_path.open("w")
        proc = subprocess.Popen(
            [*LOYALTY, "worker", "--shards", "0-3", "--metrics-port", str(port)],
            env=env_for(settings.database_url),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            break  # serving
        log.close()
        assert "Address already in use" in log_path.read_text(), log_path.read_text()
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                if 'loyalty_projection_lag_events{projection="members"}' in text:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        assert "loyalty_pipeline_windows_total" in text
        assert 'loyalty_projection_lag_events{projection="members"}' in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0, log_path.read_text()


def test_metrics_are_off_the_api_port_by_default_and_need_the_token(
    settings: Settings, db: Database, client: TestClient
) -> None:
    with TestClient(create_app(settings, db=db)) as default:
        assert default.get("/metrics").status_code == 404
        assert "/metrics" not in default.get("/openapi.json").json()["paths"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": METRICS_TOKEN}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert "loyalty_" not in response.text
    assert "loyalty_http_requests_total" in scrape(client)


def test_serve_exposes_metrics_on_their_own_port(tmp_path: Path) -> None:
    metrics_port = free_port()
    with serve_process(
        f"sqlite:///{tmp_path / 'm.db'}",
        "--no-worker",
        healthy=False,  # the metrics port is awaited below, with the API's /healthz
        stop_timeout=30,
        LOYALTY_METRICS_PORT=str(metrics_port),
    ) as server:
        proc, api_port = server.proc, server.port
        deadline = time.monotonic() + 60
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).text
                assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2).is_success
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert "loyalty_http_requests_total" in text
        assert httpx.get(f"http://127.0.0.1:{api_port}/metrics").status_code == 404
