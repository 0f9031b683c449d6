"""POST /v1/ingress/batches: authenticated batch ingress."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import Container, ContainerDep, IngestKey
from loyalty.api.problems import ApiProblem, validation_errors
from loyalty.api.schemas import Batch, BatchAccepted, Problem, RejectedEvent
from loyalty.application.ingress import IncomingEvent

router = APIRouter(tags=["ingress"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "malformed JSON"},
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "the key's role may not ingest"},
    413: {"model": Problem, "description": "over the event or byte limit"},
    415: {"model": Problem, "description": "not application/json"},
    422: {"model": Problem, "description": "schema errors; nothing was stored"},
    503: {"model": Problem, "description": "database unavailable; nothing was stored"},
}


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    too_large = ApiProblem(413, "batch_too_large", f"a batch may have at most {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiProblem(400, "bad_content_length", "Content-Length must be a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiProblem(415, "unsupported_media_type", "send Content-Type: application/json")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiProblem(415, "unsupported_content_encoding", "send an uncompressed body")


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_batch(body: bytes, container: Container) -> tuple[str, list[IncomingEvent]]:
    """Validate straight from the raw bytes; any error rejects the whole batch."""
    settings = container.settings
    try:
        batch = Batch.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise ApiProblem(400, "malformed_json", "the body is not valid JSON") from None
        raise ApiProblem(422, "validation_error", errors=validation_errors(errors)) from None
    if len(batch.events) > settings.max_batch_events:
        raise ApiProblem(
            413, "too_many_events", f"a batch may have at most {settings.max_batch_events} events"
        )
    events: list[IncomingEvent] = []
    errors_out: list[dict[str, str]] = []
    for index, ev in enumerate(batch.events):
        loc = f"events[{index}].attributes"
        try:
            attributes = orjson.dumps(ev.attributes)
        except orjson.JSONEncodeError as exc:
            errors_out.append({"loc": loc, "msg": f"cannot be stored: {exc}"})
            continue
        if len(attributes) > settings.max_attributes_bytes:
            errors_out.append(
                {"loc": loc, "msg": f"must be at most {settings.max_attributes_bytes} bytes"}
            )
            continue
        if b"\\u0000" in attributes and _has_nul(ev.attributes):
            errors_out.append({"loc": loc, "msg": "must not contain NUL characters"})
            continue
        events.append(
            IncomingEvent(ev.event_id, ev.user_id, ev.type, ev.occurred_at, attributes.decode())
        )
    if errors_out:
        raise ApiProblem(422, "validation_error", errors=errors_out)
    return batch.batch_id or uuid.uuid4().hex, events


@router.post(
    "/v1/ingress/batches",
    status_code=202,
    response_model=BatchAccepted,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}},
        }
    },
)
async def post_batch(request: Request, principal: IngestKey, container: ContainerDep) -> Any:
    """Accept a batch of activity events; resent events count as duplicates."""
    check_content_type(request)
    body = await read_limited_body(request, container.settings.max_batch_bytes)

    def work() -> BatchAccepted:
        batch_id, events = parse_batch(body, container)
        result = container.ingest.ingest(principal.name, events)
        return BatchAccepted(
            batch_id=batch_id,
            accepted=result.accepted,
            duplicates=result.duplicates,
            rejected=[
                RejectedEvent(index=r.index, event_id=r.event_id, reason=r.reason)
                for r in result.rejected
            ],
        )

    return await run_in_threadpool(work)
