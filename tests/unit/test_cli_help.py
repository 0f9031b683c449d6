"""#33 item 7: every command's --help reads as prose: no reStructuredText literals, no
module paths, no line breaks of the source in the middle of a sentence."""

from __future__ import annotations

import re
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from loyalty.cli import app
from loyalty.cli.help_text import tidy_help


def command_paths() -> list[list[str]]:
    def walk(command: Any, path: list[str]) -> list[list[str]]:
        found = [path]
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, [*path, name])
        return found

    return walk(get_command(app), [])


PATHS = command_paths()


def render(path: list[str], width: int = 1000) -> str:
    result = CliRunner().invoke(
        app, [*path, "--help"], env={"COLUMNS": str(width)}, terminal_width=width
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered() -> None:
    assert len(PATHS) > 30 and ["rules", "compensation", "resume"] in PATHS


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "loyalty")
def test_help_has_no_literals_module_paths_or_hard_breaks(path: list[str]) -> None:
    out = render(path)
    assert "``" not in out
    assert not re.search(r"\bloyalty\.[a-z_]+\.[a-z_]+|:func:|:class:|\b[a-z_]+\.py\b", out)
    description = out.split("╭")[0]
    lines = [line.strip() for line in description.splitlines()]
    for line, following in zip(lines, lines[1:], strict=False):
        # wide enough for any paragraph: a line followed by more text ends a sentence
        # or is an item of a list
        if line and following and not line.startswith("Usage:"):
            assert re.search(r"[.:;)!?]$", line) or re.match(r"[-*•] |\d+[.)] ", following), (
                f"hard break in {path}: {line!r} / {following!r}"
            )
    # the commands' summaries: one row each (a row without a name is a hard break)
    if "─ Commands ─" in out:
        box = out.split("─ Commands ─")[1].split("╰")[0]
        rows = [r.strip("│").rstrip() for r in box.splitlines()[1:] if r.startswith("│")]
        assert all(r[:2].strip() for r in rows), box


def test_the_rules_group_names_everything_it_holds() -> None:
    out = render(["rules"])
    summary = out.split("╭")[0]
    for command in ("show", "load", "dry-run", "apply", "compensation"):
        assert command in summary, command


def test_tidy_help_keeps_lists_and_click_verbatim_paragraphs() -> None:
    text = "One\n    line.\n\n- a\n  b\n- c\n\n\b\nkeep\nthis"
    assert tidy_help(text) == "One line.\n\n- a b\n- c\n\n\b\nkeep\nthis"
