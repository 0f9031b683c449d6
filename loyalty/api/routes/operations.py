"""Operator endpoints: weighting rules and pipeline status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import Container, ContainerDep, OperatorKey, problem_of
from loyalty.api.guards import BodyProblem, check_json_content_type, read_limited_body
from loyalty.api.problems import ApiProblem
from loyalty.api.schemas import PipelineBody, Problem, rules_document
from loyalty.application.commands.rules import RulesBody, rule_set_to_wire

router = APIRouter(tags=["operations"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "needs an operator key"},
}
RULES_MAX_BYTES = 1024 * 1024


@router.get(
    "/v1/rules",
    summary="Read the current rule set",
    response_model=RulesBody,
    response_model_exclude_unset=True,
    responses=_ERRORS,
)
async def get_rules(_key: OperatorKey, container: ContainerDep) -> Any:
    """The current weighting rules and rank ladder, with their version."""
    rule_set = await run_in_threadpool(container.rule_book.current)
    return rule_set_to_wire(rule_set)


@router.put(
    "/v1/rules",
    summary="Replace the rule set (a new version)",
    response_model=RulesBody,
    response_model_exclude_unset=True,
    responses={**_ERRORS, 422: {"model": Problem, "description": "invalid rules"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/RulesRequest"}}
            },
        }
    },
)
async def put_rules(request: Request, key: OperatorKey, container: ContainerDep) -> Any:
    """Store a new version of the rules; later awards use it and record its version."""
    try:
        check_json_content_type(request.headers)
        body = await read_limited_body(
            request.headers, request.stream(), RULES_MAX_BYTES, "body_too_large"
        )
        wire = rules_document(body)
    except BodyProblem as exc:
        if exc.code == "invalid_rules":
            errors = [{"loc": "body", "msg": "must be an object"}]
            raise ApiProblem(422, "invalid_rules", errors=errors) from None
        raise problem_of(exc) from None
    rule_set = await run_in_threadpool(container.rule_book.replace, wire, key.name)
    return rule_set_to_wire(rule_set)


def pipeline_status(container: Container) -> PipelineBody:
    """How far the pipeline has got (the API's ``GET /v1/pipeline`` and the console)."""
    report = container.pipeline.report()
    return PipelineBody(
        pending=report.pending,
        oldest_pending_age_s=report.oldest_pending_age_s,
        processed_total=report.processed_total,
        awards_total=report.awards_total,
        quarantined_events=report.quarantined_events,
    )


@router.get(
    "/v1/pipeline",
    summary="Read the pipeline's status",
    response_model=PipelineBody,
    responses=_ERRORS,
)
async def get_pipeline(_key: OperatorKey, container: ContainerDep) -> PipelineBody:
    """How far the weighting pipeline has got."""
    return await run_in_threadpool(pipeline_status, container)
