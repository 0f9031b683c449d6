"""Rank ladder: ordered ranks, each unlocked by a lifetime rank-points threshold."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loyalty.domain.errors import InvalidRules, Problem
from loyalty.domain.qualification import RankQualification


@dataclass(frozen=True)
class Rank:
    """A named rank unlocked at ``min_rank_points`` lifetime rank points."""

    name: str
    min_rank_points: int
    privileges: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept any iterable of privileges but store an immutable tuple.
        object.__setattr__(self, "privileges", tuple(self.privileges))


@dataclass(frozen=True)
class RankLadder:
    """Ranks in increasing order of ``min_rank_points`` (validated on creation)."""

    ranks: tuple[Rank, ...] = ()
    qualification: RankQualification | None = None
    """None: ranks by lifetime rank points (the default); else by a qualification
    period (see ``loyalty.domain.qualification``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        problems = self.problems(self.ranks)
        if problems:
            raise InvalidRules(problems)

    @staticmethod
    def problems(ranks: Sequence[Rank]) -> list[Problem]:
        """Every problem of ``ranks`` as a ladder, located like ``ranks[1].name``."""
        problems: list[Problem] = []
        names: list[tuple[int, str | None]] = []
        thresholds: list[tuple[int, int | None]] = []
        for i, rank in enumerate(ranks):
            loc = f"ranks[{i}]"
            if not isinstance(rank, Rank):
                problems.append((loc, "must be a Rank"))
                names.append((i, None))
                thresholds.append((i, None))
                continue
            if not isinstance(rank.name, str) or not rank.name.strip():
                problems.append((f"{loc}.name", "must be a non-empty string"))
                names.append((i, None))
            else:
                names.append((i, rank.name))
            points = rank.min_rank_points
            if not is_int(points):
                problems.append((f"{loc}.min_rank_points", "must be an integer"))
                thresholds.append((i, None))
            elif points < 0:
                problems.append((f"{loc}.min_rank_points", "must be >= 0"))
                thresholds.append((i, None))
            else:
                thresholds.append((i, points))
            for j, privilege in enumerate(rank.privileges):
                if not isinstance(privilege, str) or not privilege.strip():
                    problems.append((f"{loc}.privileges[{j}]", "must be a non-empty string"))
        problems.extend(ladder_order_problems(names, thresholds))
        return problems

    def rank_for(self, points: int) -> Rank | None:
        """The highest rank whose threshold is <= ``points``; None below all."""
        for rank in reversed(self.ranks):
            if rank.min_rank_points <= points:
                return rank
        return None

    def names(self) -> tuple[str, ...]:
        return tuple(rank.name for rank in self.ranks)

    def order(self, name: str | None) -> int:
        """Position of the rank ``name`` in the ladder (-1: none, or not in it)."""
        for i, rank in enumerate(self.ranks):
            if rank.name == name:
                return i
        return -1

    def named(self, name: str | None) -> Rank | None:
        found = self.order(name)
        return self.ranks[found] if found >= 0 else None


def is_int(value: object) -> bool:
    """True for real integers; ``bool`` is deliberately not an integer here."""
    return isinstance(value, int) and not isinstance(value, bool)


def ladder_order_problems(
    names: Iterable[tuple[int, str | None]],
    thresholds: Iterable[tuple[int, int | None]],
) -> list[Problem]:
    """Duplicate names and non-increasing thresholds, by original list index.

    Entries given as None (already reported invalid) are skipped, so one bad entry
    does not produce a cascade of follow-up problems.
    """
    problems: list[Problem] = []
    first_index: dict[str, int] = {}
    for i, name in names:
        if name is None:
            continue
        if name in first_index:
            problems.append(
                (f"ranks[{i}].name", f"duplicate rank name (see ranks[{first_index[name]}])")
            )
        else:
            first_index[name] = i
    previous: tuple[int, int] | None = None
    for i, points in thresholds:
        if points is None:
            continue
        if previous is not None and points <= previous[1]:
            problems.append(
                (
                    f"ranks[{i}].min_rank_points",
                    f"must be greater than ranks[{previous[0]}].min_rank_points "
                    f"({previous[1]}); thresholds must strictly increase",
                )
            )
        else:
            previous = (i, points)
    return problems
