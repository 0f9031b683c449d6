"""Member accounts: balances (and, later, spending and statements)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep, ShopKey
from loyalty.api.schemas import MemberBody, Problem

router = APIRouter(tags=["members"])

UserId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "the key's role may not do this"},
    404: {"model": Problem, "description": "no such member"},
}


@router.get("/v1/members/{user_id}", response_model=MemberBody, responses=_ERRORS)
async def get_member(user_id: UserId, _key: ShopKey, container: ContainerDep) -> MemberBody:
    """A member's balances, rank and privileges."""

    def work() -> MemberBody:
        member = container.accounts.get(user_id)
        ranks = container.rules.current().ranks
        return MemberBody(
            user_id=member.user_id,
            currency=member.currency,
            rank_points=member.rank_points,
            rank=member.current_rank(ranks),
            privileges=list(member.privileges(ranks)),
            lifetime_currency=member.lifetime_currency,
        )

    return await run_in_threadpool(work)
