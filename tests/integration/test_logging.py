"""Structured logs and request ids (no database)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.concurrency import run_in_threadpool

from loyalty.observability import (
    JsonFormatter,
    Metrics,
    MetricsMiddleware,
    RequestIdFilter,
    RequestIdMiddleware,
    configure_logging,
    request_id_var,
    sane_request_id,
)

log = logging.getLogger("loyalty.test")


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """A JSON handler on the root logger, writing into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(old_level)


def records(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_formatter_writes_one_object_per_line(json_lines: io.StringIO) -> None:
    log.info("two\nlines %s", "here")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = json_lines.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "two\nlines here"
    assert first["level"] == "INFO" and first["logger"] == "loyalty.test"
    assert str(first["ts"]).endswith("+00:00")
    assert "request_id" not in first
    assert second["level"] == "ERROR" and "ValueError: boom" in str(second["exc"])


def test_request_id_is_in_log_lines_inside_a_request(json_lines: io.StringIO) -> None:
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, str]:
        log.info("on the event loop")
        await run_in_threadpool(log.info, "in a worker thread")
        return {"ok": "yes"}

    app.add_middleware(MetricsMiddleware, metrics=Metrics(process=False))
    app.add_middleware(RequestIdMiddleware)
    with TestClient(app) as client:
        given = client.get("/work", headers={"X-Request-ID": "req-42.a:b"})
        generated = client.get("/work")
        insane = client.get("/work", headers={"X-Request-ID": "bad id\twith spaces"})
    assert given.headers["x-request-id"] == "req-42.a:b"
    new_id = generated.headers["x-request-id"]
    assert len(new_id) == 32 and new_id != "req-42.a:b"
    assert insane.headers["x-request-id"] not in ("bad id\twith spaces", new_id)
    ours = [r for r in records(json_lines) if r["logger"] == "loyalty.test"]
    assert [r["request_id"] for r in ours] == [
        "req-42.a:b",
        "req-42.a:b",
        new_id,
        new_id,
        insane.headers["x-request-id"],
        insane.headers["x-request-id"],
    ]
    assert request_id_var.get() is None  # reset after each request


@pytest.mark.parametrize(
    ("value", "sane"),
    [
        ("abc-123", True),
        ("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("has space", False),
        ("new\nline", False),
        ("<script>", False),
        (None, False),
    ],
)
def test_sane_request_ids(value: str | None, sane: bool) -> None:
    assert (sane_request_id(value) is not None) is sane


def test_configure_logging_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        configure_logging("json")
        configure_logging("text")
        configure_logging("json")
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1 and isinstance(added[0].formatter, JsonFormatter)
        assert logging.getLogger("uvicorn.error").propagate
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
