"""The console's errors: answered with an HTML page (or an htmx fragment), never JSON."""

from __future__ import annotations

from loyalty.api.problems import ApiProblem, to_problem


class ConsoleProblem(ApiProblem):
    """An error of a console request: answered with an HTML page (or fragment), not JSON."""


class SignInRequired(Exception):
    """No live session: a page redirects to the sign-in form, htmx is told to go there."""


def as_problem(exc: Exception) -> ApiProblem:
    """A known error (domain, API, database busy) as a problem; anything else re-raised."""
    return to_problem(exc)


def message(problem: ApiProblem) -> str:
    return problem.detail or problem.code
