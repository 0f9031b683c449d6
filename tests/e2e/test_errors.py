"""Every 500 is logged with its traceback and request id; the database being busy (a real
SQLite lock, a refused PostgreSQL connection) answers 503 with Retry-After, never 500."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from loyalty.api.app import create_app
from loyalty.config import Settings
from loyalty.observability import JsonFormatter, RequestIdFilter


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield buffer
    root.removeHandler(handler)


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}")
    api = create_app(settings)
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    api.state.holder = holder

    @api.get("/test/bug")
    def bug() -> None:
        raise RuntimeError("a bug")

    @api.get("/test/locked")
    def locked() -> None:
        other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
        try:
            other.execute("INSERT INTO t VALUES (1)")  # the holder has the write lock
        finally:
            other.close()

    @api.get("/test/refused")
    def refused() -> None:
        psycopg.connect("postgresql://postgres@127.0.0.1:1/none", connect_timeout=2)

    return api


def test_a_bug_is_a_500_logged_with_traceback_and_request_id(
    app: FastAPI, json_lines: io.StringIO
) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/test/bug", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "req-500"
    assert response.json()["code"] == "internal_error" and "req-500" in response.json()["detail"]
    logged = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    errors = [r for r in logged if r["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "req-500"
    assert "RuntimeError: a bug" in str(errors[0]["exc"]) and "Traceback" in str(errors[0]["exc"])


def test_a_locked_sqlite_database_is_a_503(app: FastAPI, json_lines: io.StringIO) -> None:
    app.state.holder.execute("BEGIN IMMEDIATE")
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.get("/test/locked")
    finally:
        app.state.holder.execute("ROLLBACK")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.json()["code"] == "database_busy"
    assert not [line for line in json_lines.getvalue().splitlines() if '"ERROR"' in line]


def test_a_refused_database_connection_is_a_503(app: FastAPI) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/test/refused")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
