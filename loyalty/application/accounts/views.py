"""What the API (and the console) show of members: an account as it stands once its
pending earnings are recorded, its statement, the leaderboard; and the operator's
adjustment, which answers with the account."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Protocol

from loyalty.application.accounts.spending import Spending
from loyalty.application.accounts.store import Accounts
from loyalty.application.pipeline import RulesSource
from loyalty.application.projections import HistoryEntry
from loyalty.domain.expiry import Expiring, expiring
from loyalty.domain.member import Member


class LeaderboardRowLike(Protocol):
    @property
    def user_id(self) -> str: ...
    @property
    def rank_points(self) -> int: ...


class Statements(Protocol):
    """The projected statements (``adapters/read_models.py``)."""

    def has_member(self, user_id: str) -> bool: ...
    def history(
        self, user_id: str, limit: int, before: int | None = None
    ) -> Sequence[HistoryEntry]: ...
    def leaderboard(self, limit: int) -> Sequence[LeaderboardRowLike]: ...


@dataclass(frozen=True, slots=True)
class AccountView:
    user_id: str
    currency: int
    rank_points: int
    rank: str | None
    privileges: list[str]
    lifetime_currency: int
    pending_currency: int
    pending_rank_points: int
    expiring: list[Expiring]
    rank_points_this_period: int
    rank_valid_until: date | None
    rank_points_to_keep: int
    rank_points_to_next: int | None


@dataclass(frozen=True, slots=True)
class PendingLine:
    """What the balance holds that the statement does not list yet: earnings weighed
    but not recorded on the account (whole units, as ``GET /v1/members/{id}`` counts
    them)."""

    currency: int
    rank_points: int


@dataclass(frozen=True, slots=True)
class StatementPage:
    entries: list[HistoryEntry]
    more: bool
    """True when older entries follow the last one."""
    pending: PendingLine | None = None
    """On the first page: the pending part of the balance (None: nothing pending)."""


@dataclass(frozen=True, slots=True)
class LeaderboardPlace:
    user_id: str
    rank_points: int
    rank: str | None
    position: int
    """1 for the most rank points; members with equal points share a position (the next
    one after them skips: 1, 2, 2, 4)."""


class MemberViews:
    def __init__(
        self,
        accounts: Accounts,
        spending: Spending,
        rules: RulesSource,
        statements: Statements,
        clock: Callable[[], datetime],
    ) -> None:
        self._accounts = accounts
        self._spending = spending
        self._rules = rules
        self._statements = statements
        self._clock = clock

    def get(self, user_id: str) -> Member:
        """The member's aggregate (raises ``MemberNotFound``)."""
        return self._accounts.get(user_id)

    def account(self, member: Member) -> AccountView:
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
        return AccountView(
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

    def view(self, user_id: str) -> AccountView:
        return self.account(self.get(user_id))

    def adjust(
        self,
        user_id: str,
        adjustment_id: str,
        currency: int,
        rank_points: int,
        reason: str,
        source: str,
    ) -> tuple[AccountView, bool]:
        """An operator's adjustment under the current rank ladder; the account after it
        and whether the request replayed an earlier one."""
        done = self._spending.adjust_marked(
            user_id,
            adjustment_id,
            currency,
            rank_points,
            reason,
            self._rules.current().ranks,
            source,
        )
        return self.account(done.member), done.replayed

    def history(self, user_id: str, limit: int, before: int | None = None) -> StatementPage:
        """A member's statement, newest first, older than position ``before`` (raises
        ``MemberNotFound`` for no account; an account not projected yet has an empty
        statement). The first page (``before`` None) also says what is pending: the
        part of the balance not in any entry yet."""
        rows = list(self._statements.history(user_id, limit + 1, before))
        if not rows and not self._statements.has_member(user_id):
            self._accounts.get(user_id)  # 404 unless the account exists (not projected yet)
        pending = None
        if before is None:
            view = self.view(user_id)
            if view.pending_currency or view.pending_rank_points:
                pending = PendingLine(view.pending_currency, view.pending_rank_points)
        return StatementPage(rows[:limit], len(rows) > limit, pending)

    def leaderboard(self, limit: int) -> list[LeaderboardPlace]:
        """Members by rank points, highest first; ties by user id."""
        rows = self._statements.leaderboard(limit)
        ranks = self._rules.current().ranks
        places: list[LeaderboardPlace] = []
        for index, row in enumerate(rows):
            rank = ranks.rank_for(row.rank_points)
            tied = places and places[-1].rank_points == row.rank_points
            position = places[-1].position if tied else index + 1
            places.append(
                LeaderboardPlace(
                    row.user_id,
                    row.rank_points,
                    rank.name if rank is not None else None,
                    position,
                )
            )
        return places
