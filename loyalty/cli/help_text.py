"""Commands' help as a terminal shows it: the docstrings' paragraphs, not their lines."""

from __future__ import annotations

import inspect
import re

import typer

_LIST_ITEM = re.compile(r"^(?:[-*•] |\d+[.)] )")
_LITERAL = re.compile(r"``([^`]+)``")
_ROLE = re.compile(r":(?:func|class|mod|meth|attr):`~?([^`]+)`")


def tidy_help(text: str | None) -> str | None:
    """A docstring as help for a terminal: its paragraphs joined into lines the terminal
    wraps (the source's line breaks are not the reader's), list items kept one per line,
    reStructuredText literals (````x````) as 'x'. A paragraph starting with ``\b`` keeps
    its lines (click's convention)."""
    if text is None:
        return None
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.splitlines():
            line = line.strip()
            if lines and not _LIST_ITEM.match(line):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    joined = "\n\n".join(paragraphs)
    return _LITERAL.sub(r"'\1'", _ROLE.sub(r"'\1'", joined))


def tidy_app(typer_app: typer.Typer) -> None:
    """Every command's and group's help (options' are one line each): see tidy_help."""
    info = typer_app.info
    if isinstance(info.help, str):
        info.help = tidy_help(info.help)
    for command in typer_app.registered_commands:
        doc = command.callback.__doc__ if command.callback is not None else None
        command.help = tidy_help(command.help if isinstance(command.help, str) else doc)
    for group in typer_app.registered_groups:
        if isinstance(group.help, str):
            group.help = tidy_help(group.help)
        if group.typer_instance is not None:
            tidy_app(group.typer_instance)
