"""Tables of the ways out: webhook subscriptions, durable delivery cursors, dead letters
and member.forgotten notices (both backends, SQLAlchemy Core)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from loyalty.adapters.db import Database
from loyalty.adapters.tables import forget_markers, metadata
from loyalty.application.delivery import (
    FORGOTTEN,
    DeadLetter,
    FeedEvent,
    Notice,
    Subscription,
    forgotten_event_id,
)
from loyalty.domain.member import Member

Timestamp = sa.DateTime(timezone=True)

webhook_subscriptions = sa.Table(
    "webhook_subscriptions",
    metadata,
    sa.Column("subscription_id", sa.String(32), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event_types", sa.Text, nullable=False),
    sa.Column("secret", sa.String(128), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)
delivery_cursors = sa.Table(
    "delivery_cursors",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Column("failing_since", Timestamp),
    sa.Column("last_error", sa.Text),
)
webhook_dead_letters = sa.Table(
    "webhook_dead_letters",
    metadata,
    sa.Column("letter_id", sa.String(32), primary_key=True),
    sa.Column("subscription_id", sa.String(32), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False),
    sa.Column("failed_at", Timestamp, nullable=False),
    sa.Index("webhook_dead_letters_sub_idx", "subscription_id"),
    sa.Index("webhook_dead_letters_user_idx", "user_id"),
)
delivery_notices = sa.Table(
    "delivery_notices",
    metadata,
    sa.Column("notice_id", sa.String(64), primary_key=True),
    sa.Column("channel", sa.String(64), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("occurred_at", Timestamp, nullable=False),
    sa.Index("delivery_notices_channel_idx", "channel"),
)
RELAY_CHANNEL = "relay"


def _aware(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _event_from_payload(payload: str, position: int) -> FeedEvent:
    body = orjson.loads(payload)
    return FeedEvent(
        body["id"],
        position,
        body["type"],
        body["user_id"],
        _aware(body["occurred_at"].replace("Z", "+00:00")),
        body["data"],
    )


class SqlDeliveryStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pg = db.backend == "postgresql"

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self._pg else sqlite.insert)(table)

    # -- cursors ---------------------------------------------------------------------
    def cursor(self, name: str) -> int:
        with self._db.read() as conn:
            value = conn.execute(
                sa.select(delivery_cursors.c.position).where(delivery_cursors.c.name == name)
            ).scalar()
        return int(value or 0)

    def save_cursor(self, name: str, position: int) -> None:
        stmt = self._insert(delivery_cursors).values(
            name=name, position=position, updated_at=datetime.now(UTC)
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"position": stmt.excluded.position, "updated_at": stmt.excluded.updated_at},
        )
        with self._db.write() as conn:
            conn.execute(stmt)

    def set_failing(self, name: str, error: str | None) -> None:
        """Mark the way out failing (keeping the first ``failing_since`` of a run of
        failures) or, with None, delivering again."""
        t = delivery_cursors.c
        values: dict[str, Any] = (
            {"failing_since": None, "last_error": None}
            if error is None
            else {
                "failing_since": sa.func.coalesce(t.failing_since, datetime.now(UTC)),
                "last_error": error[:500],
            }
        )
        with self._db.write() as conn:
            conn.execute(delivery_cursors.update().where(t.name == name).values(**values))

    def erased(self, events: Sequence[FeedEvent]) -> set[str]:
        """The ids of ``events`` recorded no later than a forget-me of their member was
        requested (its marker: erasing or done); read now, not from a cache. An event
        recorded after the request belongs to the fresh account of a returning member."""
        if not events:
            return set()
        by_member: dict[str, list[FeedEvent]] = {}
        for event in events:
            by_member.setdefault(str(Member.create_id(event.user_id)), []).append(event)
        m = forget_markers.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(m.member_id, m.requested_at).where(m.member_id.in_(list(by_member)))
            ).all()
        erased: set[str] = set()
        for member_id, requested_at in rows:
            cut = _aware(requested_at)
            erased.update(e.id for e in by_member[member_id] if e.occurred_at <= cut)
        return erased

    def cursors(self) -> dict[str, int]:
        with self._db.read() as conn:
            rows = conn.execute(sa.select(delivery_cursors.c.name, delivery_cursors.c.position))
            return {r[0]: int(r[1]) for r in rows}

    # -- subscriptions ---------------------------------------------------------------
    def create_subscription(
        self, url: str, event_types: tuple[str, ...], start: int
    ) -> Subscription:
        """A new subscription, delivering what commits after ``start`` (its cursor)."""
        subscription = Subscription(
            uuid.uuid4().hex, url, event_types, new_secret(), datetime.now(UTC)
        )
        with self._db.write() as conn:
            conn.execute(
                webhook_subscriptions.insert().values(
                    subscription_id=subscription.subscription_id,
                    url=url,
                    event_types=orjson.dumps(list(event_types)).decode(),
                    secret=subscription.secret,
                    created_at=subscription.created_at,
                )
            )
            conn.execute(
                delivery_cursors.insert().values(
                    name=subscription.channel, position=start, updated_at=datetime.now(UTC)
                )
            )
        return subscription

    def subscriptions(self) -> list[Subscription]:
        t, c = webhook_subscriptions.c, delivery_cursors.c
        channel = sa.literal("webhook:") + t.subscription_id
        query = (
            sa.select(webhook_subscriptions, c.failing_since, c.last_error)
            .select_from(webhook_subscriptions.outerjoin(delivery_cursors, c.name == channel))
            .order_by(t.created_at)
        )
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [
            Subscription(
                r.subscription_id,
                r.url,
                tuple(orjson.loads(r.event_types)),
                r.secret,
                _aware(r.created_at),
                _aware(r.failing_since) if r.failing_since is not None else None,
                r.last_error,
            )
            for r in rows
        ]

    def get_subscription(self, subscription_id: str) -> Subscription | None:
        for s in self.subscriptions():
            if s.subscription_id == subscription_id:
                return s
        return None

    def delete_subscription(self, subscription_id: str) -> bool:
        channel = f"webhook:{subscription_id}"
        with self._db.write() as conn:
            deleted = conn.execute(
                webhook_subscriptions.delete().where(
                    webhook_subscriptions.c.subscription_id == subscription_id
                )
            ).rowcount
            conn.execute(delivery_cursors.delete().where(delivery_cursors.c.name == channel))
            conn.execute(
                webhook_dead_letters.delete().where(
                    webhook_dead_letters.c.subscription_id == subscription_id
                )
            )
            conn.execute(delivery_notices.delete().where(delivery_notices.c.channel == channel))
        return bool(deleted)

    # -- dead letters ----------------------------------------------------------------
    def add_dead_letter(
        self, subscription_id: str, event: FeedEvent, attempts: int, error: str
    ) -> None:
        with self._db.write() as conn:
            conn.execute(
                webhook_dead_letters.insert().values(
                    letter_id=uuid.uuid4().hex,
                    subscription_id=subscription_id,
                    event_id=event.id,
                    position=event.position,
                    user_id=event.user_id,
                    event_type=event.type,
                    payload=orjson.dumps(event.body()).decode(),
                    attempts=attempts,
                    last_error=error[:1000],
                    failed_at=datetime.now(UTC),
                )
            )

    def dead_letters(self, subscription_id: str | None = None) -> list[DeadLetter]:
        t = webhook_dead_letters.c
        query = sa.select(webhook_dead_letters).order_by(t.failed_at, t.position)
        if subscription_id is not None:
            query = query.where(t.subscription_id == subscription_id)
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [
            DeadLetter(
                r.letter_id,
                r.subscription_id,
                _event_from_payload(r.payload, int(r.position)),
                int(r.attempts),
                r.last_error,
                _aware(r.failed_at),
            )
            for r in rows
        ]

    def dead_letter_count(self) -> int:
        with self._db.read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(webhook_dead_letters)
                ).scalar_one()
            )

    def delete_dead_letter(self, letter_id: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                webhook_dead_letters.delete().where(webhook_dead_letters.c.letter_id == letter_id)
            )

    # -- member.forgotten notices ----------------------------------------------------
    def notices(self, channel: str, limit: int) -> list[Notice]:
        t = delivery_notices.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(delivery_notices)
                .where(t.channel == channel)
                .order_by(t.occurred_at, t.notice_id)
                .limit(limit)
            ).all()
        return [
            Notice(
                r.notice_id,
                FeedEvent(r.event_id, 0, FORGOTTEN, r.user_id, _aware(r.occurred_at), {}),
            )
            for r in rows
        ]

    def delete_notice(self, notice_id: str) -> None:
        with self._db.write() as conn:
            conn.execute(delivery_notices.delete().where(delivery_notices.c.notice_id == notice_id))

    def erase_member(self, user_id: str, request_id: str, requested_at: datetime) -> dict[str, int]:
        """Forget-me: drop the member's dead letters, and owe every durable way out that
        delivers member.forgotten one notice (deterministic ids: a resumed step adds
        none twice)."""
        channels = [
            s.channel
            for s in self.subscriptions()
            if not s.event_types or FORGOTTEN in s.event_types
        ]
        if RELAY_CHANNEL in self.cursors():
            channels.append(RELAY_CHANNEL)
        event_id = forgotten_event_id(request_id)
        with self._db.write() as conn:
            letters = conn.execute(
                webhook_dead_letters.delete().where(webhook_dead_letters.c.user_id == user_id)
            ).rowcount
            for channel in channels:
                notice_id = hashlib.sha256(f"{request_id}:{channel}".encode()).hexdigest()
                conn.execute(
                    self._insert(delivery_notices)
                    .values(
                        notice_id=notice_id,
                        channel=channel,
                        event_id=event_id,
                        user_id=user_id,
                        occurred_at=requested_at,
                    )
                    .on_conflict_do_nothing()
                )
        return {"webhook_dead_letters": int(letters)}
