"""What a user id may be: one rule for every entry point of the API (ingest, the member
routes, adjustments, forget requests).

A user id is opaque text chosen by the client, stored exactly as sent (never rewritten:
rewriting could merge two of the client's users into one member). It must be
addressable as one path segment of ``/v1/members/{user_id}`` and read back the same way
every time, so it is refused (422) when it:

- is empty or longer than 128 characters;
- is not in Unicode normalization form NFC (the composed form: ``é`` as one code
  point, not ``e`` + combining accent; two spellings of one name are not two ids);
- contains a control character (Cc), a format character (Cf: bidi overrides, zero-width
  characters, BOM), a lone surrogate (Cs) or U+FFFD (the replacement character: every
  invalid percent-escape such as ``%ff`` decodes to it, so it cannot name one member);
- contains ``/`` (it would split the path), or is ``.`` or ``..`` (clients and proxies
  resolve them as path steps).

Anything else (spaces, ``?``, ``#``, ``%``, emoji, any script) is allowed: percent-encode
it in URLs (``/v1/members/a%3Fb``).
"""

from __future__ import annotations

import unicodedata

MAX_LENGTH = 128
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})
_DOT_SEGMENTS = frozenset({".", ".."})


def user_id_problem(user_id: str) -> str | None:
    """Why ``user_id`` is refused, or None if it is a valid user id."""
    if not 1 <= len(user_id) <= MAX_LENGTH:
        return f"must have 1 to {MAX_LENGTH} characters"
    if "/" in user_id:
        return "must not contain /"
    if user_id in _DOT_SEGMENTS:
        return "must not be . or .."
    if user_id.isascii():
        if not user_id.isprintable():
            return "must not contain control characters"
        return None
    for char in user_id:
        if char == "\ufffd":
            return "must not contain U+FFFD (an invalid escape decodes to it)"
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            return "must not contain control, format (bidi, zero-width) or surrogate characters"
    if not unicodedata.is_normalized("NFC", user_id):
        return "must be in Unicode normalization form NFC"
    return None


def check_user_id(user_id: str) -> str:
    """``user_id`` if valid, else ValueError saying why."""
    problem = user_id_problem(user_id)
    if problem is not None:
        raise ValueError(problem)
    return user_id
