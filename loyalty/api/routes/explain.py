"""Award explanations and the rule dry run (issue 20)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep, OperatorKey, ShopKey, read_json_body
from loyalty.api.problems import ApiProblem, validation_errors
from loyalty.api.routes.members import UserId
from loyalty.api.routes.operations import RULES_MAX_BYTES
from loyalty.api.schemas import DryRunBody, ExplanationBody, Problem
from loyalty.application.commands.periods import DryRunRequest
from loyalty.application.commands.rules import parse_rule_set

router = APIRouter(tags=["explanations"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "the key's role may not do this"},
}
AwardId = Annotated[str, Path(min_length=1, max_length=200)]


@router.get(
    "/v1/members/{user_id}/awards/{award_id}",
    summary="Explain an award",
    response_model=ExplanationBody,
    responses={**_ERRORS, 404: {"model": Problem, "description": "award_not_found"}},
)
async def explain_award(
    user_id: UserId, award_id: AwardId, _key: ShopKey, container: ContainerDep
) -> Any:
    """Why an award is what it is (``pending``: the award not recorded yet)."""
    explanations = container.explanations
    assert explanations is not None
    return await run_in_threadpool(explanations.explain, user_id, award_id)


@router.post(
    "/v1/rules/dry-run",
    summary="Dry-run a rule set over retained events",
    response_model=DryRunBody,
    responses={
        **_ERRORS,
        422: {"model": Problem, "description": "invalid rules | period_not_retained"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/DryRunRequest"}}
            },
        }
    },
)
async def dry_run(request: Request, _key: OperatorKey, container: ContainerDep) -> Any:
    """What a candidate rule set would have awarded over retained days (read-only)."""
    _raw, wire = await read_json_body(request, RULES_MAX_BYTES)
    try:
        body = DryRunRequest.model_validate(wire)
    except ValueError as exc:
        errors = exc.errors() if hasattr(exc, "errors") else []
        raise ApiProblem(422, "validation_error", errors=validation_errors(errors)) from None
    candidate = parse_rule_set(body.rules, 0)
    runner = container.dry_run
    assert runner is not None
    return await run_in_threadpool(runner.run, candidate, body.from_, body.to)
