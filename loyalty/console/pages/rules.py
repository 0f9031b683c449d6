"""The rules editor: the current rules and their versions, save (with a confirmation
naming what changes), and the dry run of the editor's rules over past days."""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import suppress
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import Container, ContainerDep
from loyalty.api.guards import BodyProblem
from loyalty.api.schemas import rules_document
from loyalty.application.commands.fields import StoredInt
from loyalty.application.commands.periods import DryRunPeriod
from loyalty.application.commands.rules import parse_rule_set, rule_set_to_wire
from loyalty.application.rule_history import RuleChange, diff_rules, full_wire, history
from loyalty.console.auth import SessionDep
from loyalty.console.forms import FormDep, confirmation, confirmed, form_command
from loyalty.console.locate import line_of
from loyalty.console.problems import ConsoleProblem, as_problem, message
from loyalty.console.rendering import PREFIX, is_htmx, render
from loyalty.domain.errors import DomainError, InvalidRules
from loyalty.domain.rules import RuleSet

router = APIRouter()

DRY_RUN_DAYS = 7
"""The dry run's default period: the last 7 UTC days, today included (within retention)."""


HISTORY_PAGE = 10
"""Versions per page of the rules page's history (paged by version: ``?before=N``)."""


def rules_context(
    container: Container, text: str | None = None, before: int | None = None
) -> dict[str, Any]:
    current = container.rules.current()
    today = container.clock().date()
    days = min(DRY_RUN_DAYS, container.settings.retention_days)
    versions = container.rules.versions(HISTORY_PAGE + 1, before=before)
    entries = history(versions)[:HISTORY_PAGE]
    return {
        "current": current,
        "text": text if text is not None else json.dumps(full_wire(current), indent=2),
        "versions": entries,
        "older": entries[-1].version.version if len(versions) > HISTORY_PAGE else None,
        "dry_from": today - timedelta(days=days - 1),
        "dry_through": today,
        "dry_run": None,
    }


@router.get("/rules")
async def rules_page(
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    before: Annotated[StoredInt | None, Query()] = None,
) -> Response:
    context = await run_in_threadpool(rules_context, container, None, before)
    return render(
        request, "rules.html", session=session, page="rules", errors=[], saved=None, **context
    )


@router.get("/rules/versions/{version}")
async def rules_version(
    version: Annotated[StoredInt, PathParam()],
    request: Request,
    container: ContainerDep,
    session: SessionDep,
) -> Response:
    found = await run_in_threadpool(container.rules.versions, 2, version + 1)
    if not found or found[0].version != version:
        raise ConsoleProblem(404, "not_found", "no such rules version")
    entry = history(found)[0]
    text = json.dumps(full_wire(entry.version.wire), indent=2)
    return render(
        request,
        "rules_version.html",
        session=session,
        page="rules",
        version=version,
        entry=entry,
        text=text,
    )


def parse_rules_text(text: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The editor's JSON as an object, read as ``PUT /v1/rules`` reads its body
    (:func:`~loyalty.api.schemas.rules_document`), or the errors that stop it (a syntax
    error with its line and column)."""
    try:
        return rules_document(text.encode("utf-8", "surrogatepass")), []
    except BodyProblem as exc:
        cause = exc.__cause__
        if isinstance(cause, json.JSONDecodeError):
            where = f"line {cause.lineno}, column {cause.colno}"
            return None, [{"loc": where, "msg": cause.msg, "line": cause.lineno}]
        line = 1 if exc.code == "invalid_rules" else None
        return None, [{"loc": "(document)", "msg": exc.detail, "line": line}]


def located(text: str, exc: InvalidRules) -> list[dict[str, Any]]:
    """The problems of a rules document, each with the line of the editor it is about."""
    return [
        {"loc": loc or "(document)", "msg": msg, "line": line_of(text, loc)}
        for loc, msg in exc.problems
    ]


@router.post("/rules")
async def save_rules(
    request: Request, container: ContainerDep, session: SessionDep, form: FormDep
) -> Response:
    text = form.get("rules", "")
    sure = confirmed(form)

    def work() -> tuple[int, list[dict[str, Any]], int | None, list[str]]:
        wire, errors = parse_rules_text(text)
        if wire is None:
            return 422, errors, None, []
        try:
            if not sure:  # judged as the save would, then shown before anything is stored
                candidate = parse_rule_set(wire, 0)
                return 200, [], None, rules_changes(container, candidate)
            saved = container.rules.put(wire, container.clock(), author=session.principal.name)
        except InvalidRules as exc:
            return 422, located(text, exc), None, []
        return 200, [], saved.version, []

    status, errors, saved, changes = await run_in_threadpool(work)
    if changes:
        diff = await run_in_threadpool(rules_diff, container, text)
        return confirmation(
            request,
            session,
            page="rules",
            title="save the rules as a new version",
            effects=changes,
            action=f"{PREFIX}/rules",
            fields={"rules": text},
            button="Save the new version",
            back=f"{PREFIX}/rules",
            changes=diff,
        )
    context = await run_in_threadpool(rules_context, container, None if saved else text)
    return render(
        request,
        "rules.html",
        status,
        session=session,
        page="rules",
        errors=errors,
        saved=saved,
        **context,
    )


def rules_diff(container: Container, text: str) -> list[RuleChange]:
    """The editor's rules against the current ones, field by field (as the history
    will show the saved version)."""
    wire, _ = parse_rules_text(text)
    assert wire is not None  # judged by the save before
    candidate = rule_set_to_wire(parse_rule_set(wire, 0))
    return diff_rules(rule_set_to_wire(container.rules.current()), candidate)


def rules_changes(container: Container, candidate: RuleSet) -> list[str]:
    """What saving ``candidate`` does, for the confirmation step: its version, and each
    part that differs from the current rules (the dry run shows the effect on members)."""
    current = container.rules.current()
    now, new = rule_set_to_wire(current), rule_set_to_wire(candidate)
    effects = [
        f"the rules become version {current.version + 1} (now {current.version}); awards "
        "from now on are weighed by them (past awards stay as they are)"
    ]
    old_rules = {r["event_type"]: r for r in now.get("rules", [])}
    new_rules = {r["event_type"]: r for r in new.get("rules", [])}
    for label, names in (
        ("event types added", sorted(new_rules.keys() - old_rules.keys())),
        ("event types removed (no longer earn)", sorted(old_rules.keys() - new_rules.keys())),
        (
            "event types reweighted",
            sorted(t for t in new_rules.keys() & old_rules.keys() if new_rules[t] != old_rules[t]),
        ),
    ):
        if names:
            effects.append(f"{label}: {', '.join(names)}")
    for part, label in (
        ("ranks", "the rank ladder changes (members may move rank)"),
        ("currency_expiry", "currency expiry changes"),
        ("rank_qualification", "rank qualification changes"),
    ):
        if now.get(part) != new.get(part):
            effects.append(f"{label}: {json.dumps(new.get(part))}")
    if len(effects) == 1:
        effects.append("nothing differs from the current rules but the version number")
    return effects


def dry_run_of(container: Container, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """The dry run (#20) of the editor's rules over ``from`` .. ``through`` (UTC days,
    both included): (status, {result} or {errors}). Reads only; nothing is saved."""
    runner = container.dry_run
    assert runner is not None
    text = form.get("rules", "")
    wire, errors = parse_rules_text(text)
    if wire is None:
        return 422, {"errors": errors}
    try:
        period = form_command(DryRunPeriod, form)
    except ConsoleProblem as exc:
        errors = [{**e, "line": None} for e in exc.errors or []]
        return 422, {"errors": errors}
    try:
        candidate = parse_rule_set(wire, 0)
        result = runner.run(candidate, period.from_, period.through)
    except InvalidRules as exc:
        return 422, {"errors": located(text, exc)}
    except DomainError as exc:  # the period: empty, outside retention, in the future
        problem = as_problem(exc)
        return problem.status, {
            "errors": [{"loc": "period", "msg": message(problem), "line": None}]
        }
    return 200, {"result": result}


@router.post("/rules/dry-run")
async def rules_dry_run(
    request: Request, container: ContainerDep, session: SessionDep, form: FormDep
) -> Response:
    status, dry_run = await run_in_threadpool(dry_run_of, container, form)
    if is_htmx(request):
        return render(request, "_dry_run.html", status, session=session, dry_run=dry_run)
    context = await run_in_threadpool(rules_context, container, form.get("rules", ""))
    context["dry_run"] = dry_run
    with suppress(ConsoleProblem):
        period = form_command(DryRunPeriod, form)
        context["dry_from"], context["dry_through"] = period.from_, period.through
    return render(
        request,
        "rules.html",
        status,
        session=session,
        page="rules",
        errors=[],
        saved=None,
        **context,
    )
