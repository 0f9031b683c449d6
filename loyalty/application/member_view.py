"""A member's view: balances, rank and privileges as they stand once the pending
earnings are recorded (``GET /v1/members/{id}``, the adjustment's answer and the
console's member page read this one computation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from loyalty.application.accounts import Accounts
from loyalty.application.pipeline import RulesSource
from loyalty.domain.expiry import Expiring, expiring
from loyalty.domain.member import Member


@dataclass(frozen=True)
class MemberView:
    """What a member holds (the fields of the API's ``MemberBody``)."""

    user_id: str
    currency: int
    rank_points: int
    rank: str | None
    privileges: list[str]
    lifetime_currency: int
    pending_currency: int
    pending_rank_points: int
    expiring: list[Expiring]
    """The next expiries under the rules' currency_expiry, soonest first."""
    rank_points_this_period: int
    rank_valid_until: date | None
    rank_points_to_keep: int
    rank_points_to_next: int | None


class MemberViews:
    """Builds :class:`MemberView` from the accounts, the current rules and the clock."""

    def __init__(
        self, accounts: Accounts, rules: RulesSource, clock: Callable[[], datetime]
    ) -> None:
        self._accounts = accounts
        self._rules = rules
        self._clock = clock

    def get(self, user_id: str) -> MemberView:
        """The view of ``user_id`` (``MemberNotFound`` when there is no account)."""
        return self.of(self._accounts.get(user_id))

    def of(self, member: Member) -> MemberView:
        """The account as it stands once its pending earnings are recorded: the fold a
        spend records them with (``Accounts.with_pending``), so what the view shows as
        currency a spend accepts, always (pending currency of an expired lot expires at
        recording and is not shown)."""
        rule_set = self._rules.current()
        ranks = rule_set.ranks
        after = self._accounts.with_pending(member, ranks)
        currency = after.currency - member.currency  # the pending part of the balance
        rank_points = after.rank_points - member.rank_points
        qualification = ranks.qualification
        if qualification is None:
            rank = ranks.rank_for(after.rank_points)
            period_points = after.rank_points
            valid_until = None
            to_keep = 0
        else:  # the rank once recorded; points of the period (pending counted as earned today)
            today = self._clock().astimezone(UTC).date()
            rank = ranks.named(after.rank)
            period_points = qualification.period_points(member.rank_days, today) + rank_points
            threshold = rank.min_rank_points if rank is not None else 0
            valid_until = qualification.valid_until(member.rank_days, today, threshold)
            to_keep = max(0, threshold - period_points) if threshold else 0
        held = rank.min_rank_points if rank is not None else -1
        above = [r.min_rank_points for r in ranks.ranks if r.min_rank_points > held]
        return MemberView(
            user_id=member.user_id,
            currency=after.currency,
            rank_points=after.rank_points,
            rank=rank.name if rank is not None else None,
            privileges=list(rank.privileges) if rank is not None else [],
            lifetime_currency=after.lifetime_currency,
            pending_currency=currency,
            pending_rank_points=rank_points,
            expiring=expiring(after.lots, rule_set.currency_expiry),
            rank_points_this_period=period_points,
            rank_valid_until=valid_until,
            rank_points_to_keep=to_keep,
            rank_points_to_next=max(0, min(above) - period_points) if above else None,
        )
