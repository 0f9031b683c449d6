"""A member's page: balances, rank progress and history; spend, refund and adjust
(forms read as the JSON API's commands); why an award is what it is."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from loyalty.adapters.console_sessions import ConsoleSession
from loyalty.adapters.read_models import MEMBER_ORDERS, MemberRow
from loyalty.api.deps import Container, ContainerDep
from loyalty.api.problems import ApiProblem
from loyalty.application.commands.accounts import AdjustmentRequest, RefundRequest, SpendRequest
from loyalty.console.auth import SessionDep
from loyalty.console.forms import FormDep, form_command
from loyalty.console.problems import ConsoleProblem, as_problem, message
from loyalty.console.rendering import is_htmx, render
from loyalty.domain.errors import DomainError
from loyalty.domain.member import Member
from loyalty.domain.user_ids import user_id_problem

router = APIRouter()


def member_view(container: Container, user_id: str) -> dict[str, Any]:
    """Everything the member page shows, or ``missing`` when there is no account."""
    try:
        member = container.accounts.get(user_id)
    except DomainError as exc:
        return {"missing": message(as_problem(exc))}
    body = container.members.account(member)
    ladder = container.rules.current().ranks.ranks
    names = [r.name for r in ladder]
    held = names.index(body.rank) if body.rank in names else -1
    progress = None
    if body.rank_points_to_next is not None and held + 1 < len(ladder):
        # as the API counts it (the qualification period's points under rank_qualification)
        target = ladder[held + 1]
        start = ladder[held].min_rank_points if held >= 0 else 0
        have = target.min_rank_points - body.rank_points_to_next
        span = max(1, target.min_rank_points - start)
        progress = {
            "next": target.name,
            "need": body.rank_points_to_next,
            "percent": min(100, max(0, round(100 * (have - start) / span))),
        }
    history = container.read_models.history(user_id, 50)
    return {
        "member": body,
        "progress": progress,
        "history": history,
        "missing": None,
        "refundable": refundable(member),
    }


def member_context(container: Container, user_id: str) -> dict[str, Any]:
    problem = user_id_problem(user_id) if user_id else None
    if not user_id or problem:
        return {"user_id": user_id, "invalid": problem, "member": None, "missing": None}
    return {"user_id": user_id, "invalid": None, **member_view(container, user_id)}


MEMBERS_PAGE = 20
"""Members per page of the member list."""
LIST_LABELS = {
    "recent": "Recently changed",
    "top": "Top by rank points",
    "id": "By user id",
}


def cursor_of(row: MemberRow) -> str:
    """The position after ``row`` in any order, as an opaque query parameter."""
    raw = json.dumps([row.user_id, row.rank_points, row.updated_at.isoformat()])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def row_of_cursor(cursor: str) -> MemberRow:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        user_id, points, at = json.loads(raw)
        return MemberRow(str(user_id), 0, int(points), datetime.fromisoformat(at))
    except (ValueError, TypeError) as exc:
        raise ConsoleProblem(
            422, "validation_error", f"after: not a page position ({exc})"
        ) from None


def member_list(container: Container, order: str, prefix: str, after: str) -> dict[str, Any]:
    """A page of the member list: members whose id starts with ``prefix`` in ``order``
    after the cursor ``after``, and the next page's cursor (None: the last page)."""
    if order not in MEMBER_ORDERS:
        raise ConsoleProblem(422, "validation_error", f"list: one of {', '.join(MEMBER_ORDERS)}")
    if len(prefix) > 128:
        raise ConsoleProblem(422, "validation_error", "id prefix: at most 128 characters")
    start = row_of_cursor(after) if after else None
    rows = container.read_models.find_members(order, MEMBERS_PAGE + 1, prefix, start)
    more = len(rows) > MEMBERS_PAGE
    rows = rows[:MEMBERS_PAGE]
    following = None
    if more:
        following = "?" + urlencode({"q": prefix, "list": order, "after": cursor_of(rows[-1])})
    return {
        "rows": rows,
        "order": order,
        "order_label": LIST_LABELS[order],
        "prefix": prefix,
        "paged": bool(after),
        "next_page": following,
    }


@router.get("/members")
async def members_page(
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    user_id: str = "",
    q: str = "",
    order: Annotated[str, Query(alias="list")] = "",
    after: str = "",
) -> Response:
    """One member by exact id (``user_id``), else a page of the member list: ids that
    start with ``q``, recently changed (the default), top by rank points or by id."""
    context = await run_in_threadpool(member_context, container, user_id.strip())
    listing = None
    if not user_id.strip():
        prefix = q.strip()
        chosen = order or ("id" if prefix else "recent")
        listing = await run_in_threadpool(member_list, container, chosen, prefix, after)
    return render(
        request,
        "member.html",
        session=session,
        page="members",
        adjustment_id=uuid.uuid4().hex,
        result=None,
        listing=listing,
        **context,
    )


@router.get("/members/explain")
async def explain_award(
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    user_id: str = "",
    award_id: str = "",
) -> Response:
    """Why an award (or the pending one, ``award_id=pending``) is what it is (#20)."""
    explanations = container.explanations
    assert explanations is not None
    if user_id_problem(user_id) or not award_id or len(award_id) > 200:
        raise ConsoleProblem(404, "award_not_found", "no such award")

    def work() -> dict[str, Any]:
        try:
            return explanations.explain(user_id, award_id)
        except DomainError as exc:
            problem = as_problem(exc)
            raise ConsoleProblem(problem.status, problem.code, message(problem)) from None

    explanation = await run_in_threadpool(work)
    return render(request, "_explanation.html", session=session, e=explanation)


def member_action_of(
    container: Container, session: ConsoleSession, action: str, form: Mapping[str, str]
) -> tuple[str, str]:
    """Run ``action`` on the member named by the form; (message, member user id)."""
    user_id = form.get("user_id", "")
    problem = user_id_problem(user_id)
    if problem:
        raise ConsoleProblem(422, "validation_error", f"user id: {problem}")
    source = session.principal.name
    spending = container.spending
    if action == "spend":
        spend = form_command(SpendRequest, form)
        result = spending.spend(user_id, spend.order_id, spend.amount, source)
        return f"spent {result.amount} on order {result.order_id}", user_id
    if action == "refund":
        refund = form_command(RefundRequest, form)
        owner = refund.source or order_source(container, user_id, refund.order_id, source)
        by = None if owner == source else source
        result = spending.refund(
            user_id, refund.order_id, owner, by, refund.refund_id, refund.amount
        )
        whose = "" if by is None else f" (placed by {owner}; refunded by {by})"
        return f"refunded {result.amount} of order {result.order_id}{whose}", user_id
    adjust = form_command(AdjustmentRequest, form)
    ranks = container.rules.current().ranks
    spending.adjust(
        user_id,
        adjust.adjustment_id,
        adjust.currency,
        adjust.rank_points,
        adjust.reason,
        ranks,
        source,
    )
    currency, points = adjust.currency, adjust.rank_points
    return f"adjusted by {currency:+d} currency and {points:+d} rank points", user_id


def order_source(container: Container, user_id: str, order_id: str, own: str) -> str:
    """Whose order ``order_id`` of the member an operator refunds when the form names no
    source: the operator's own if it has one, else the one source that has it (an order
    id two shops used must be named: a 409 listing them)."""
    try:
        sources = container.accounts.get(user_id).order_sources(order_id)
    except DomainError:
        return own  # the refund answers member_not_found
    if own in sources or None in sources or not sources:
        return own  # a legacy order answers every source; none: order_not_found
    if len(sources) > 1:
        listed = ", ".join(str(s) for s in sources)
        raise ConsoleProblem(
            409,
            "ambiguous_order",
            f"order {order_id} was placed by several sources ({listed}): choose one",
        )
    return str(sources[0])


def refundable(member: Member) -> dict[str, list[str]]:
    """Per order id, the sources of the member's unrefunded orders (the history's
    Refund buttons)."""
    found: dict[str, list[str]] = {}
    for key in member.orders:
        if key not in member.refunded_orders:
            source, order_id = json.loads(key)
            found.setdefault(order_id, []).append("" if source is None else source)
    return found


@router.post("/members/{action}")
async def member_action(
    action: str,
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    form: FormDep,
) -> Response:
    if action not in ("spend", "refund", "adjust"):
        raise ConsoleProblem(404, "not_found")
    user_id = form.get("user_id", "")

    def work() -> tuple[int, dict[str, Any]]:
        try:
            text, _ = member_action_of(container, session, action, form)
            status, outcome = 200, {"ok": True, "message": text}
        except (ApiProblem, DomainError) as exc:
            problem = as_problem(exc)
            status, outcome = problem.status, {"ok": False, "message": message(problem)}
        return status, {**outcome, **member_context(container, user_id)}

    status, context = await run_in_threadpool(work)
    context.update(action=action, adjustment_id=uuid.uuid4().hex)
    if is_htmx(request):
        return render(request, "_member_result.html", status, session=session, **context)
    result = {"action": action, "ok": context["ok"], "message": context["message"]}
    context.update(result=result)
    return render(request, "member.html", status, session=session, page="members", **context)
