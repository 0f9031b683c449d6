"""Abuse: keys (hashed, constant-time, never in URLs, bounded cache), a per-key rate limit
on ingest, request size limits before parsing, nothing personal or secret in error
bodies or logs, security headers, and source isolation of ingress events."""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import secrets
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from loyalty.adapters import keys as keys_module
from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.api.app import create_app
from loyalty.api.guards import RateLimiter
from loyalty.application.access import Role
from loyalty.config import Settings

BATCHES = "/v1/ingress/batches"
MIB = 1024 * 1024


def events(n: int, prefix: str = "e", user: str = "u1") -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "events": [
            {"event_id": f"{prefix}{i}", "user_id": user, "type": "logged_on", "occurred_at": now}
            for i in range(n)
        ]
    }


def ingress_rows(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM ingress_events")).scalar_one())


# ------------------------------------------------------------------------------ keys


def test_keys_are_stored_hashed_only(db: Database) -> None:
    key = KeyStore(db).create(Role.SHOP, "shop")
    match = keys_module.KEY_PATTERN.match(key)
    assert match is not None
    secret = match.group(2)
    with db.read() as conn:
        rows = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM api_keys")).all()]
    dumped = repr(rows)
    assert secret not in dumped and key not in dumped
    assert hashlib.sha256(secret.encode()).hexdigest() in dumped


def test_keys_are_compared_in_constant_time() -> None:
    source = inspect.getsource(KeyStore.verify)
    assert "hmac.compare_digest" in source
    assert "==" not in source.split("compare_digest", 1)[1].split("\n", 1)[0]


def test_keys_are_accepted_in_the_authorization_header_only(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    key = make_key("operator", "ops")["Authorization"].removeprefix("Bearer ")
    assert client.get("/v1/pipeline", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for query in ("api_key", "key", "access_token", "token", "authorization"):
        assert client.get(f"/v1/pipeline?{query}={key}").status_code == 401
    assert client.get("/v1/pipeline", cookies={"api_key": key}).status_code == 401
    assert client.get("/v1/pipeline", headers={"X-API-Key": key}).status_code == 401
    document = client.app.openapi()  # type: ignore[attr-defined]
    for path, operations in document["paths"].items():
        assert "key" not in path.lower() and "token" not in path.lower()
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                assert parameter["in"] != "cookie"
                assert "key" not in parameter["name"] and "token" not in parameter["name"]


def test_unknown_key_ids_do_not_grow_the_cache(db: Database) -> None:
    store = KeyStore(db, cache_seconds=60)
    store.MAX_CACHED = 50  # type: ignore[misc]
    for _ in range(400):
        token = f"lk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
        assert store.verify(token) is None
        assert len(store._cache) <= 50
    good = store.create(Role.SHOP, "shop")
    assert store.verify(good) is not None


def test_a_bad_key_gets_the_same_answer_whatever_is_wrong(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    key = make_key("shop", "shop")["Authorization"].removeprefix("Bearer ")
    key_id = key.split("_")[1]
    wrong_secret = f"lk_{key_id}_{secrets.token_urlsafe(32)}"
    unknown_id = f"lk_{secrets.token_hex(8)}_{key.rsplit('_', 1)[1]}"
    bodies = set()
    for token in (wrong_secret, unknown_id, "garbage", key + "x"):
        response = client.get("/v1/members/u1", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert token not in response.text and key_id not in response.text
        bodies.add(response.text)
    assert len(bodies) == 1


# ------------------------------------------------------------------------ rate limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_counts_events_not_requests() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=100, burst=200, clock=clock)
    assert limiter.take("a", 150) == 0.0
    assert limiter.take("a", 50) == 0.0
    wait = limiter.take("a", 1)
    assert wait == pytest.approx(0.01)
    assert limiter.take("b", 200) == 0.0  # per key
    clock.now += 1.0
    assert limiter.take("a", 100) == 0.0
    assert limiter.take("a", 1) > 0
    assert limiter.wait("a") > 0 and limiter.wait("nobody") == 0.0
    assert RateLimiter.retry_after(0.01) == "1" and RateLimiter.retry_after(2.2) == "3"
    clock.now += 10
    assert limiter.take("a", 10_000) == 0.0  # over the burst: a full bucket lets it pass
    assert RateLimiter(rate=0, burst=0).take("a", 10**9) == 0.0  # off


def test_ingest_is_rate_limited_per_key_with_retry_after(settings: Settings, db: Database) -> None:
    limited = settings.model_copy(
        update={
            "ingest_rate_limit_events_per_s": 100.0,
            "ingest_rate_limit_burst": 150,
            "max_batch_events": 100,
        }
    )
    clock = FakeClock()
    app = create_app(limited, db=db)
    container = app.state.container
    assert container.ingest_limiter.burst == 150
    container.ingest_limiter._clock = clock
    store = KeyStore(db)
    a = {"Authorization": f"Bearer {store.create(Role.INGEST, 'games')}"}
    a2 = {"Authorization": f"Bearer {store.create(Role.INGEST, 'games')}"}  # same source
    with TestClient(app) as http:
        assert http.post(BATCHES, json=events(100, "a"), headers=a).status_code == 202
        before = ingress_rows(db)
        refused = http.post(BATCHES, json=events(100, "b"), headers=a)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        assert ingress_rows(db) == before  # nothing stored
        assert http.post(BATCHES, json=events(50, "c"), headers=a).status_code == 202
        # now empty: refused before the body is even read
        assert (
            http.post(
                BATCHES, content=b"not json", headers={**a, "Content-Type": "application/json"}
            ).status_code
            == 429
        )
        assert http.post(BATCHES, json=events(100, "d"), headers=a2).status_code == 202
        clock.now += 1.0  # 100 more events earned
        assert http.post(BATCHES, json=events(100, "b"), headers=a).status_code == 202
    assert ingress_rows(db) == 350


# ----------------------------------------------------------------------- size limits


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("POST", "/v1/members/u1/spend", "shop"),
        ("POST", "/v1/members/u1/refunds", "shop"),
        ("POST", "/v1/members/u1/adjustments", "operator"),
        ("POST", "/v1/forget-requests", "operator"),
        ("PUT", "/v1/rules", "operator"),
    ],
)
def test_bodies_over_the_limit_are_refused_before_parsing(
    client: TestClient,
    make_key: Callable[..., dict[str, str]],
    method: str,
    path: str,
    role: str,
) -> None:
    headers = {**make_key(role, role), "Content-Type": "application/json"}
    big = b'{"order_id": "' + b"x" * (2 * MIB) + b'"}'
    response = client.request(method, path, content=big, headers=headers)
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"order_id": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    response = client.request(method, path, content=chunks(), headers=headers)
    assert response.status_code == 413, response.text
    lying = {**headers, "Content-Length": "abc"}
    assert client.request(method, path, content=b"{}", headers=lying).status_code in (400, 413)


def test_ingest_keeps_its_own_8_mib_limit(
    client: TestClient, make_key: Callable[..., dict[str, str]], db: Database
) -> None:
    headers = {**make_key("ingest", "games"), "Content-Type": "application/json"}
    body = events(1)
    body["events"][0]["attributes"] = {"s": "z" * (2 * MIB)}
    import json

    response = client.post(BATCHES, content=json.dumps(body), headers=headers)
    assert response.status_code == 422  # 2 MiB passes the body limit; attributes do not
    response = client.post(BATCHES, content=b"x" * (9 * MIB), headers=headers)
    assert response.status_code == 413 and response.json()["code"] == "batch_too_large"
    assert ingress_rows(db) == 0


# ---------------------------------------------------------- error bodies and logs


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    # the test's own HTTP client logs its URLs: only the server's records count
    handler.addFilter(lambda record: not record.name.startswith(("httpx", "httpcore")))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)


def test_error_bodies_and_logs_hold_no_user_id_or_key(
    settings: Settings, db: Database, logs: io.StringIO
) -> None:
    limited = settings.model_copy(
        update={
            "ingest_rate_limit_events_per_s": 1.0,
            "ingest_rate_limit_burst": 1,
            "max_batch_events": 2,
        }
    )
    marker = f"marker-{uuid.uuid4().hex}"
    store = KeyStore(db)
    keys = {r: store.create(Role(r), f"{r}-src") for r in ("ingest", "shop", "operator")}
    h = {r: {"Authorization": f"Bearer {k}"} for r, k in keys.items()}
    answers = []
    with TestClient(create_app(limited, db=db), raise_server_exceptions=False) as http:
        member = f"/v1/members/{marker}"
        adjust = {"adjustment_id": "a", "currency": 5, "rank_points": 0, "reason": "r"}
        assert http.post(member + "/adjustments", json=adjust, headers=h["operator"]).is_success
        answers += [
            http.get(f"{member}-nobody", headers=h["shop"]),  # 404
            http.get(member + "/history?cursor=" + marker[:40], headers=h["shop"]),  # 422
            http.post(
                member + "/spend", json={"order_id": marker, "amount": 10**6}, headers=h["shop"]
            ),  # 409
            http.post(member + "/refunds", json={"order_id": marker}, headers=h["shop"]),  # 404
            http.post(
                member + "/spend", json={"order_id": marker, "amount": "1"}, headers=h["shop"]
            ),  # 422
            http.get("/v1/members/" + marker * 4, headers=h["shop"]),  # 422 (too long)
            http.get(member, headers={"Authorization": f"Bearer {keys['shop']}x"}),  # 401
            http.get("/v1/pipeline", headers=h["shop"]),  # 403
            http.post(BATCHES, json=events(1, "x", user=marker + "\x01"), headers=h["ingest"]),
            http.post(BATCHES, json=events(3, "w", user=marker), headers=h["ingest"]),  # 413
            http.post(BATCHES, json=events(2, "y", user=marker), headers=h["ingest"]),
            http.post(BATCHES, json=events(2, "z", user=marker), headers=h["ingest"]),  # 429
        ]
    statuses = sorted({a.status_code for a in answers})
    assert statuses == [202, 401, 403, 404, 409, 413, 422, 429], statuses
    secrets_ = [part for key in keys.values() for part in (key, key[20:])]
    for answer in answers:
        assert marker not in answer.text, answer.text
        for secret in secrets_:
            assert secret not in answer.text
    text = logs.getvalue()
    assert marker not in text
    for secret in secrets_:
        assert secret not in text


# ------------------------------------------------------------------- security headers


def test_security_headers_on_every_response(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    shop = make_key("shop", "shop")
    responses = {
        "ok": client.get("/healthz"),
        "member 404": client.get("/v1/members/nobody", headers=shop),
        "401": client.get("/v1/members/nobody"),
        "422": client.get("/v1/leaderboard?limit=0", headers=shop),
        "413": client.post("/v1/members/u/spend", content=b"x" * (2 * MIB), headers=shop),
        "415": client.post(BATCHES, content=b"{}", headers={**make_key(), "Content-Type": "x/y"}),
        "404 route": client.get("/nowhere"),
        "405": client.delete("/healthz"),
        "openapi": client.get("/openapi.json"),
        "metrics": client.get("/metrics"),
    }
    for name, response in responses.items():
        assert response.headers["x-content-type-options"] == "nosniff", name
        assert response.headers["x-frame-options"] == "DENY", name
        assert response.headers["referrer-policy"] == "no-referrer", name
        assert response.headers["cache-control"] == "no-store", name
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, name
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in docs.headers["content-security-policy"]  # its own policy


# ------------------------------------------------------------------ source isolation


def test_a_source_can_neither_spoof_nor_collide_with_another(
    client: TestClient, make_key: Callable[..., dict[str, str]], db: Database
) -> None:
    games = make_key("ingest", "games")
    shop = make_key("ingest", "shop")
    same = events(3, "shared-")
    first = client.post(BATCHES, json=same, headers=games).json()
    assert (first["accepted"], first["duplicates"]) == (3, 0)
    other = client.post(BATCHES, json=same, headers=shop).json()
    assert (other["accepted"], other["duplicates"]) == (3, 0)  # no collision across sources
    again = client.post(BATCHES, json=same, headers=shop).json()
    assert (again["accepted"], again["duplicates"]) == (0, 3)
    # a body cannot name a source: the key's name is the source
    for spoof in ({**same, "source": "shop"}, {"events": [{**same["events"][0], "source": "x"}]}):
        response = client.post(BATCHES, json=spoof, headers=games)
        assert response.status_code == 422
    with db.read() as conn:
        rows = conn.execute(
            sa.text("SELECT source, count(*) FROM ingress_events GROUP BY source ORDER BY 1")
        ).all()
    assert [tuple(r) for r in rows] == [("games", 3), ("shop", 3)]
    assert keys_module.NAME_PATTERN.match("games")


# ------------------------------------------------- the key before the body, 400 / 415

WRITE_ROUTES = [
    ("POST", "/v1/members/u/spend", "shop"),
    ("POST", "/v1/members/u/refunds", "shop"),
    ("POST", "/v1/members/u/adjustments", "operator"),
    ("POST", "/v1/forget-requests", "operator"),
    ("PUT", "/v1/rules", "operator"),
    ("POST", BATCHES, "ingest"),
]


@pytest.mark.parametrize(("method", "path", "role"), WRITE_ROUTES)
def test_bodies_are_judged_only_after_the_key_with_400_and_415(
    client: TestClient,
    make_key: Callable[..., dict[str, str]],
    method: str,
    path: str,
    role: str,
) -> None:
    json_type = {"Content-Type": "application/json"}
    bad_bodies = [
        (b'{"order_id": ', json_type),  # malformed
        (b'{"a": 1, "a": 2}', json_type),  # duplicate key
        (b"x" * 1000, {"Content-Type": "text/plain"}),
        (b'{"a": 1}', {**json_type, "Content-Encoding": "gzip"}),
    ]
    wrong = make_key("ingest" if role != "ingest" else "shop", "other")
    for body, headers in bad_bodies:  # no key, or a key of the wrong role: never parsed
        response = client.request(method, path, content=body, headers=headers)
        assert (response.status_code, response.json()["code"]) == (401, "missing_api_key")
        response = client.request(method, path, content=body, headers={**headers, **wrong})
        assert response.status_code == 403, response.text
    key = make_key(role, role)
    # (ingress judges a body's schema before its keys: 422 either way)
    duplicate = "validation_error" if path == BATCHES else "duplicate_key"
    expected = [(400, "malformed_json"), (422, duplicate)]
    expected += [(415, "unsupported_media_type"), (415, "unsupported_content_encoding")]
    for (body, headers), (status, code) in zip(bad_bodies, expected, strict=True):
        response = client.request(method, path, content=body, headers={**headers, **key})
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
        assert response.headers["content-type"] == "application/problem+json"
    template = path.replace("/u/", "/{user_id}/")
    operation = client.get("/openapi.json").json()["paths"][template][method.lower()]
    assert {"400", "401", "403", "413", "415", "422"} <= set(operation["responses"])
    assert "application/json" in operation["requestBody"]["content"]


def test_no_slash_redirect_echoes_the_host(client: TestClient) -> None:
    response = client.get("/healthz/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
