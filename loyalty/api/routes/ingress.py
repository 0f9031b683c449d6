"""POST /v1/ingress/batches: authenticated batch ingress."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, NotRequired

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict, StringConstraints, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from typing_extensions import TypedDict

from loyalty.api.deps import Container, ContainerDep, IngestKey, problem_of
from loyalty.api.guards import (
    BodyProblem,
    RateLimiter,
    check_json_content_type,
    has_duplicate_keys,
    keys_counted,
    read_limited_body,
    repeated_key_location,
)
from loyalty.api.problems import ApiProblem, malformed_json, validation_errors
from loyalty.api.schemas import BatchAccepted, Problem
from loyalty.application.commands.fields import (
    RFC3339,
    USER_ID_PATTERN,
    EventType,
    Identifier,
    parse_rfc3339,
)
from loyalty.application.commands.ingress import Batch
from loyalty.application.ingress import IncomingEvent
from loyalty.domain.user_ids import MAX_LENGTH, user_id_problem

router = APIRouter(tags=["ingress"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "malformed JSON"},
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "the key's role may not ingest"},
    413: {"model": Problem, "description": "over the event or byte limit"},
    429: {"model": Problem, "description": "the key's event rate limit; see Retry-After"},
    415: {"model": Problem, "description": "not application/json"},
    422: {"model": Problem, "description": "schema errors; nothing was stored"},
    503: {"model": Problem, "description": "database unavailable; nothing was stored"},
}


async def read_batch_body(request: Request, limit: int) -> bytes:
    """The batch body: 415 unless JSON and uncompressed, 413 ``batch_too_large`` as soon
    as it exceeds ``limit`` bytes."""
    try:
        check_json_content_type(request.headers)
        return await read_limited_body(request.headers, request.stream(), limit, "batch_too_large")
    except BodyProblem as exc:
        raise problem_of(exc) from None


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class _FastEvent(TypedDict):
    """:class:`IngressEvent`'s constraints, with ``occurred_at`` still text."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    event_id: Identifier
    # the rest of the user-id rule: in parse_batch, for the ids that need it
    user_id: Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_LENGTH, pattern=USER_ID_PATTERN)
    ]
    type: EventType
    occurred_at: Annotated[str, StringConstraints(pattern=RFC3339.pattern)]
    attributes: NotRequired[dict[str, Any]]


class _FastBatch(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    batch_id: NotRequired[Identifier | None]
    events: list[_FastEvent]


# The fast path: every check of ``Batch`` runs in pydantic-core, without a Python
# validator per event or a model instance per event. It accepts only what ``Batch``
# accepts; anything it refuses is validated again by ``Batch``, so errors (422 field
# locations and messages, 400 for malformed JSON) are exactly those of ``Batch``.
_FAST_BATCH: TypeAdapter[_FastBatch] = TypeAdapter(_FastBatch)
_fromisoformat = datetime.fromisoformat


class _SlowPath(Exception):
    """The fast path met something only ``Batch`` may judge."""


def _occurred_at(text: str) -> datetime:
    """``parse_rfc3339`` for text that already matches ``RFC3339``."""
    # Upper-case T and Z, at most 6 fractional digits: fromisoformat alone is exactly
    # what parse_rfc3339 would do with it.
    if text[10] == "T" and len(text) <= (27 if text[-1] == "Z" else 32):
        try:
            return _fromisoformat(text).astimezone(UTC)
        except (ValueError, OverflowError):
            raise _SlowPath from None
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise _SlowPath from None


_Parsed = list[tuple[str, str, str, datetime, dict[str, Any]]]


def _validate(body: bytes) -> tuple[str | None, _Parsed]:
    """(batch_id, [(event_id, user_id, type, occurred_at, attributes)]) of a valid body."""
    batch_id, events, _keys = _validate_counted(body)
    return batch_id, events


def _validate_counted(body: bytes) -> tuple[str | None, _Parsed, int | None]:
    """(batch_id, [(event_id, user_id, type, occurred_at, attributes)], keys) of a valid
    body; ``keys`` counts the keys of the batch and event objects (attributes' are left
    to the caller), or is None when the body has already been checked for duplicate
    keys."""
    try:
        batch = _FAST_BATCH.validate_json(body)
        events = [
            (
                ev["event_id"],
                ev["user_id"],
                ev["type"],
                _occurred_at(ev["occurred_at"]),
                ev.get("attributes", {}),
            )
            for ev in batch["events"]
        ]
        keys = (
            1
            + ("batch_id" in batch)
            + sum(5 if "attributes" in ev else 4 for ev in batch["events"])
        )
        return batch.get("batch_id"), events, keys
    except (ValidationError, _SlowPath):
        pass
    try:
        slow = Batch.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise malformed_json(errors) from None
        raise ApiProblem(422, "validation_error", errors=validation_errors(errors)) from None
    if has_duplicate_keys(body):
        raise _duplicate_key(body)
    events = [
        (ev.event_id, ev.user_id, ev.type, ev.occurred_at, ev.attributes) for ev in slow.events
    ]
    return slow.batch_id, events, None


def _duplicate_key(body: bytes) -> ApiProblem:
    loc = repeated_key_location(body)
    return ApiProblem(
        422,
        "duplicate_key",
        f"an object in the body repeats a key: {loc}",
        errors=[{"loc": loc, "msg": "this key appears twice in its object"}],
    )


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


def parse_batch(body: bytes, container: Container) -> tuple[str, list[IncomingEvent]]:
    """Validate straight from the raw bytes; any error rejects the whole batch."""
    settings = container.settings
    batch_id, parsed, envelope_keys = _validate_counted(body)
    if len(parsed) > settings.max_batch_events:
        raise ApiProblem(
            413, "too_many_events", f"a batch may have at most {settings.max_batch_events} events"
        )
    max_bytes = settings.max_attributes_bytes
    dumps = orjson.dumps
    events: list[IncomingEvent] = []
    errors_out: list[dict[str, str]] = []
    attribute_keys = 0
    for index, (event_id, user_id, type_, occurred_at, attrs) in enumerate(parsed):
        if not user_id.isascii() or user_id[0] == ".":  # (the pattern covered the rest)
            problem = user_id_problem(user_id)
            if problem is not None:
                errors_out.append({"loc": f"events[{index}].user_id", "msg": problem})
                continue
        try:
            attributes = dumps(attrs)
        except orjson.JSONEncodeError as exc:
            loc = f"events[{index}].attributes"
            errors_out.append({"loc": loc, "msg": f"cannot be stored: {exc}"})
            continue
        if len(attributes) > max_bytes:
            loc = f"events[{index}].attributes"
            errors_out.append({"loc": loc, "msg": f"must be at most {max_bytes} bytes"})
            continue
        if b"\\u0000" in attributes and _has_nul(attrs):
            loc = f"events[{index}].attributes"
            errors_out.append({"loc": loc, "msg": "must not contain NUL characters"})
            continue
        if b"null" in attributes and _has_non_finite(attrs):  # orjson wrote NaN/inf as null
            loc = f"events[{index}].attributes"
            errors_out.append({"loc": loc, "msg": "numbers must be finite"})
            continue
        # a lower bound of the keys parsed in ``attrs`` (exact unless a key ends in a
        # backslash): in the dump every quote inside a string is escaped, so each ":
        # that is not a key's end is a \": (see keys_counted for why a bound suffices)
        attribute_keys += attributes.count(b'":') - attributes.count(b'\\":')
        events.append(IncomingEvent(event_id, user_id, type_, occurred_at, attributes.decode()))
    if errors_out:
        raise ApiProblem(422, "validation_error", errors=errors_out)
    if (
        envelope_keys is not None
        and not keys_counted(body, envelope_keys + attribute_keys)
        and has_duplicate_keys(body)
    ):
        raise _duplicate_key(body)
    return batch_id or uuid.uuid4().hex, events


def _rate_limited(wait: float) -> ApiProblem:
    return ApiProblem(
        429,
        "rate_limited",
        "this key sent more events per second than it may; retry after Retry-After seconds",
        headers={"Retry-After": RateLimiter.retry_after(wait)},
    )


@router.post(
    "/v1/ingress/batches",
    summary="Send a batch of activity events",
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
    """Accept a batch of activity events. An event whose `event_id` this source sent
    before (in the batch or within the retention window) is not stored: it is listed in
    `duplicate_events`, as a `repeat` (same content) or a `conflict` (other content: most
    likely an id generation bug; resend it under a new id). Events of a type no current
    rule weighs are stored (a later rule set or a dry run may weigh them) and counted in
    `unweighed_types`."""
    wait = container.ingest_limiter.wait(principal.key_id)
    if wait:  # refused before reading and parsing the body
        raise _rate_limited(wait)
    body = await read_batch_body(request, container.settings.max_batch_bytes)

    def work() -> bytes:
        batch_id, events = parse_batch(body, container)
        wait = container.ingest_limiter.take(principal.key_id, len(events))
        if wait:
            raise _rate_limited(wait)
        result = container.ingest.ingest(principal.name, events)
        # Serialized here (the BatchAccepted shape, as FastAPI would write it): a
        # response model would be validated and encoded again on the event loop.
        return orjson.dumps(
            {
                "batch_id": batch_id,
                "accepted": result.accepted,
                "duplicates": result.duplicates,
                "rejected": [
                    {"index": r.index, "event_id": r.event_id, "reason": r.reason}
                    for r in result.rejected
                ],
                "conflicts": result.conflicts,
                "duplicate_events": [
                    {
                        "index": d.index,
                        "event_id": d.event_id,
                        "kind": "conflict" if d.conflict else "repeat",
                    }
                    for d in result.duplicate_events
                ],
                "unweighed_types": result.unweighed,
            }
        )

    return Response(await run_in_threadpool(work), 202, media_type="application/json")
