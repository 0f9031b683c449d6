"""Where a value sits in a JSON text: ``rules[2].currency`` -> line 14, so that the rules
editor can show each validation error at its line (the parser's own view of the
document: a small recursive-descent scan that records every value's path and start)."""

from __future__ import annotations

import json

_WHITESPACE = " \t\r\n"
_decoder = json.JSONDecoder()


def value_lines(text: str) -> dict[str, int]:
    """Every path of the JSON ``text`` (``""`` for the document, ``a.b[0].c``) with the
    line (1-based) where its value starts; ``{}`` if ``text`` is not JSON."""
    found: dict[str, int] = {}
    try:
        end = _value(text, _skip(text, 0), "", found)
    except (ValueError, IndexError, RecursionError):
        return {}
    return found if _skip(text, end) == len(text) else {}


def line_of(text: str, loc: str) -> int | None:
    """The line of ``loc`` (or of its nearest enclosing value) in ``text``."""
    lines = value_lines(text)
    while True:
        if loc in lines:
            return lines[loc]
        if not loc:
            return None
        cut = max(loc.rfind("."), loc.rfind("["))
        loc = loc[: max(cut, 0)]


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _line(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _value(text: str, i: int, path: str, found: dict[str, int]) -> int:
    found[path] = _line(text, i)
    if text[i] == "{":
        i = _skip(text, i + 1)
        if text[i] == "}":
            return i + 1
        while True:
            key, i = _decoder.raw_decode(text, i)
            if not isinstance(key, str):
                raise ValueError("a key must be a string")
            i = _skip(text, i)
            if text[i] != ":":
                raise ValueError("expected ':'")
            i = _value(text, _skip(text, i + 1), f"{path}.{key}" if path else key, found)
            i = _skip(text, i)
            if text[i] == "}":
                return i + 1
            if text[i] != ",":
                raise ValueError("expected ','")
            i = _skip(text, i + 1)
    if text[i] == "[":
        i = _skip(text, i + 1)
        if text[i] == "]":
            return i + 1
        index = 0
        while True:
            i = _skip(text, _value(text, i, f"{path}[{index}]", found))
            index += 1
            if text[i] == "]":
                return i + 1
            if text[i] != ",":
                raise ValueError("expected ','")
            i = _skip(text, i + 1)
    _scalar, end = _decoder.raw_decode(text, i)
    return int(end)
