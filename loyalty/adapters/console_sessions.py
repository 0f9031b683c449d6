"""Server-side sessions of the operator console (``console_sessions``).

The browser holds only a random session id (in an ``HttpOnly`` cookie); the table holds
its SHA-256, the id of the operator key it was opened with (never the key), the CSRF
token of its forms and its expiry. Every lookup joins ``api_keys``: a session counts only
while its key is unrevoked and still an operator key, so revoking the key signs the
console out at its next request. Expired sessions are deleted at every sign-in.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.tables import api_keys, console_sessions
from loyalty.application.access import Principal, Role


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    principal: Principal
    csrf_token: str
    expires_at: datetime


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ConsoleSessions:
    def __init__(self, db: Database, lifetime: timedelta) -> None:
        self._db = db
        self._lifetime = lifetime

    def open(self, principal: Principal, now: datetime) -> tuple[str, ConsoleSession]:
        """A new session for an operator ``principal``: (the session id for the cookie,
        the session). Deletes every expired session on the way."""
        if principal.role is not Role.OPERATOR:
            raise ValueError("only operator keys may open a console session")
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        expires = now + self._lifetime
        with self._db.write() as conn:
            conn.execute(console_sessions.delete().where(console_sessions.c.expires_at <= now))
            conn.execute(
                console_sessions.insert().values(
                    session_hash=_hash(session_id),
                    key_id=principal.key_id,
                    csrf_token=csrf,
                    created_at=now,
                    expires_at=expires,
                )
            )
        return session_id, ConsoleSession(principal, csrf, expires)

    def find(self, session_id: str, now: datetime) -> ConsoleSession | None:
        """The live session of ``session_id``: unexpired, its key unrevoked and operator."""
        if not session_id or len(session_id) > 128:
            return None
        s, k = console_sessions.c, api_keys.c
        query = (
            sa.select(s.key_id, s.csrf_token, s.expires_at, k.name, k.role)
            .select_from(console_sessions.join(api_keys, k.key_id == s.key_id))
            .where(
                s.session_hash == _hash(session_id),
                s.expires_at > now,
                k.revoked_at.is_(None),
                k.role == Role.OPERATOR.value,
            )
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return ConsoleSession(Principal(row[0], row[3], Role(row[4])), row[1], _utc(row[2]))

    def close(self, session_id: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                console_sessions.delete().where(
                    console_sessions.c.session_hash == _hash(session_id)
                )
            )

    def count(self) -> int:
        with self._db.read() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(console_sessions)).scalar() or 0
            )
