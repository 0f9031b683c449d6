"""API keys: random secrets, stored only as SHA-256 hashes, checked in constant time.

A key reads ``lk_<key_id>_<secret>``; ``key_id`` finds the row, the secret's hash is
compared with :func:`hmac.compare_digest`. The key's *name* is the event source for
ingress (several keys may share a name, so a key can be rotated without changing the
source that de-duplication is scoped to).
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.tables import api_keys
from loyalty.application.access import Principal, Role

KEY_PATTERN = re.compile(r"^lk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None = None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    MAX_CACHED = 10_000

    def __init__(self, db: Database, cache_seconds: float = 5.0) -> None:
        self._db = db
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, str, Principal | None]] = {}
        self._noted: dict[str, float] = {}  # key id -> when this process last stored a use
        self._lock = threading.Lock()

    def create(self, role: Role, name: str) -> str:
        """Store a new key and return it in full (the only time it is visible)."""
        if not NAME_PATTERN.match(name):
            raise ValueError("name must be 1-128 characters of A-Z a-z 0-9 _ . -")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self._db.write() as conn:
            conn.execute(
                api_keys.insert().values(
                    key_id=key_id,
                    name=name,
                    role=role.value,
                    secret_hash=_hash(secret),
                    created_at=datetime.now(UTC),
                )
            )
        return f"lk_{key_id}_{secret}"

    def list(self) -> list[KeyInfo]:
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(
                    api_keys.c.key_id,
                    api_keys.c.name,
                    api_keys.c.role,
                    api_keys.c.created_at,
                    api_keys.c.revoked_at,
                    api_keys.c.last_used_at,
                ).order_by(api_keys.c.created_at, api_keys.c.key_id)
            ).all()
        return [KeyInfo(r[0], r[1], Role(r[2]), r[3], r[4], r[5]) for r in rows]

    def namesakes(self, name: str) -> builtins.list[KeyInfo]:
        """The active keys named ``name`` (a second key of the same name is allowed, for a
        rotation, but worth a warning: it is easily a mistake)."""
        return [k for k in self.list() if k.name == name and k.revoked_at is None]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id (or by the full key); False if no such active key."""
        match = KEY_PATTERN.match(key_id)
        if match:
            key_id = match.group(1)
        with self._db.write() as conn:
            result = conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        with self._lock:
            self._cache.pop(key_id, None)
        return result.rowcount == 1

    def verify(self, token: str) -> Principal | None:
        """The principal for a presented key, or None if unknown, revoked or malformed."""
        match = KEY_PATTERN.match(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or cached[0] < now:
            cached = (now + self._cache_seconds, *self._load(key_id))
            with self._lock:
                if len(self._cache) >= self.MAX_CACHED and key_id not in self._cache:
                    # Random key ids (no key needed to send them) must not grow the
                    # cache without bound: drop what expired, or everything.
                    self._cache = {k: v for k, v in self._cache.items() if v[0] >= now}
                    if len(self._cache) >= self.MAX_CACHED:
                        self._cache = {}
                self._cache[key_id] = cached
        _, stored_hash, principal = cached
        # Compare even when the key is unknown, so timing does not tell the two apart.
        if hmac.compare_digest(_hash(secret), stored_hash) and principal is not None:
            self._note_use(key_id)
            return principal
        return None

    USE_GRANULARITY = 60.0
    """Seconds between two writes of a key's last-used time by one process."""

    def _note_use(self, key_id: str) -> None:
        """Store when the key was used, at most once a minute per key and process (one
        small UPDATE; the request waits for it only then)."""
        now = time.monotonic()
        with self._lock:
            if now - self._noted.get(key_id, -self.USE_GRANULARITY) < self.USE_GRANULARITY:
                return
            if len(self._noted) >= self.MAX_CACHED:
                self._noted.clear()
            self._noted[key_id] = now
        with self._db.write() as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id)
                .values(last_used_at=datetime.now(UTC).replace(second=0, microsecond=0))
            )

    def _load(self, key_id: str) -> tuple[str, Principal | None]:
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(api_keys.c.name, api_keys.c.role, api_keys.c.secret_hash).where(
                    api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None)
                )
            ).first()
        if row is None:
            return "0" * 64, None
        return row[2], Principal(key_id, row[0], Role(row[1]))
