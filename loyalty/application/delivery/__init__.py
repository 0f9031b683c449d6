"""Domain events out: one ordered feed of committed account events, and one cursor loop
that carries it to every way out (pull feed, webhooks, the RabbitMQ relay).

- :mod:`.feed`: the feed (``EventFeed``), its wire form and cursors, and the erasure
  check every way out asks before it sends.
- :mod:`.cursors`: ``CursorLoop``, the loop that carries the feed to one way out.
- :mod:`.webhooks`: subscriptions, the sink that sends and retries, the dispatcher (one
  loop per subscription) and the operators' use cases.

Each durable way out (a webhook subscription, the relay) owns a cursor (a notification
id). :class:`CursorLoop` reads a batch after its cursor, hands it to a sink that returns
only when the batch is durable elsewhere (a 2xx answer or a dead letter; broker
confirms), then moves the cursor to the batch's end: at least once, in commit order (so
in order per member), duplicates only for the batch in flight when the process died.

A forgotten member's events are deleted from the log by forget-me, so the feed stops
returning them. Events read before the deletion may still be held in memory (a batch a
webhook retries for hours) or parked (a dead letter): every way out asks the erasure
markers again at the moment it sends, parks or replays (:class:`ErasureCheck`) and drops
the events of an erased stream. Forget-me leaves one ``member.forgotten`` notice (the user
id only) per durable way out; a loop delivers its notices after each batch and deletes
them.
"""

from loyalty.application.delivery.cursors import (
    CursorLoop,
    CursorStore,
    DeliveryMetrics,
    Notice,
    Sink,
)
from loyalty.application.delivery.feed import (
    BOOKKEEPING,
    DECIMAL_FIELDS,
    EVENT_NAMESPACE,
    EVENT_TYPES,
    FORGOTTEN,
    MAX_LIMIT,
    MAX_WAIT_SECONDS,
    TOMBSTONE,
    ErasureCheck,
    EventFeed,
    FeedEvent,
    FeedPage,
    NotificationLog,
    decode_cursor,
    drop_erased,
    encode_cursor,
    event_id,
    feed_type,
    forgotten_event_id,
    member_event_types,
)
from loyalty.application.delivery.webhooks import (
    Attempt,
    DeadLetter,
    RetryPolicy,
    Subscription,
    SubscriptionSource,
    SubscriptionStore,
    WebhookAdmin,
    WebhookDispatcher,
    WebhookMetrics,
    WebhookSender,
    WebhookSink,
    WebhookStore,
)

__all__ = [
    "BOOKKEEPING",
    "DECIMAL_FIELDS",
    "EVENT_NAMESPACE",
    "EVENT_TYPES",
    "FORGOTTEN",
    "MAX_LIMIT",
    "MAX_WAIT_SECONDS",
    "TOMBSTONE",
    "Attempt",
    "CursorLoop",
    "CursorStore",
    "DeadLetter",
    "DeliveryMetrics",
    "ErasureCheck",
    "EventFeed",
    "FeedEvent",
    "FeedPage",
    "Notice",
    "NotificationLog",
    "RetryPolicy",
    "Sink",
    "Subscription",
    "SubscriptionSource",
    "SubscriptionStore",
    "WebhookAdmin",
    "WebhookDispatcher",
    "WebhookMetrics",
    "WebhookSender",
    "WebhookSink",
    "WebhookStore",
    "decode_cursor",
    "drop_erased",
    "encode_cursor",
    "event_id",
    "feed_type",
    "forgotten_event_id",
    "member_event_types",
]
